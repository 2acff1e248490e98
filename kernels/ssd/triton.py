"""Triton SSD chunked scan (Mamba2's selective scan), forward and backward: the registry's `triton`
implementation of op `ssd`, with the arguments and semantics of the eager reference
kernels/ssd/eager.py::ssd_chunked_scan (and mamba_ssm's `mamba_chunk_scan_combined`).

Per batch b and head h (group g = h // (nheads // ngroups)), inside chunk c with steps l, s and
a = cumsum of dt * A over the chunk (dt after dt_bias, softplus and the dt_limit clamp):

    y_l  = exp(a_l) C_l . S_c + sum_{s <= l} (C_l . B_s) exp(a_l - a_s) dt_s x_s + D x_l
    T_c  = sum_s exp(a_last - a_s) dt_s outer(x_s, B_s)        the chunk's own end state
    S_{c+1} = exp(a_last) S_c + T_c,  S_0 = initial_states,  final_states = S_nchunks

The forward is mamba_ssm's decomposition (kernels in kernels/ssd/triton_fwd.py): chunk cumsum
(dt processing and a), CB = C @ B^T per chunk and group, chunk states T_c, state passing (S_c in
place of T_c), chunk scan (y). The forward's intermediates (processed dt, its cumsum, CB and
the states entering each chunk) are saved for the backward (kernels/ssd/triton_bwd.py), which
then, with dy and d final_states, computes:

    1. dS_c from the chunk's outputs: sum_l exp(a_l) outer(dy_l, C_l)   (chunk-state kernel)
    2. state passing backwards: dT_c = dS_{c+1}, dS_c += exp(a_last) dS_{c+1}, d initial = dS_0,
       and d a_last = exp(a_last) <S_c, dS_{c+1}>
    3. dx, the dt-as-factor part of ddt, dB, dD, and the gradient of a (see below), by one of
       two variants (BWD_VARIANT, from MEGATRON_HYBRID_SSD_BWD at import; default split):
       split (triton_bwd.py): per (batch, chunk, group, source tile), the group's heads looped
         inside, dB's CB part multiplied by C per head;
       chunk (triton_bwd_chunk.py): dx, ddt and dD per (batch, chunk, head) over the whole
         chunk, then dB per (batch, chunk, group, source tile) with dCB summed over the
         group's heads on each chunk-position tile before one matmul with C (and the
         gradient of a's intra-chunk part from the same tiles)
    4. per target tile: dC and the state readout's part of the gradient of a
    5. chunk cumsum backwards: d(dt A) -> ddt, dA; then clamp, softplus and dt_bias.

The gradient of dt*A at step k sums terms, never differences of cumsums (which cancel when a is
large): with W[l, s] = CB[l, s] exp(a_l - a_s) dt_s (dy_l . x_s),
    d(dtA)_k = sum_{l >= k > s} W[l, s]  +  sum_{l >= k} dy_l . exp(a_l) S_c C_l
             + sum_{s < k} dt_s x_s . exp(a_last - a_s) dT_c B_s  +  d a_last.

Precision: every sum accumulates in float32. Matmul operands are the inputs' half dtype when x,
B and C share one (bf16 tensor cores; float32 intermediates such as scores, states and their
gradients are rounded to it first, as in mamba_ssm), else float32 with IEEE products. Partial
sums across programs (dA, d dt_bias, dD, d a_last) are written per program and added in torch:
no atomics, deterministic results. y is returned in x's dtype, final_states in float32, every
gradient in its input's dtype.

Memory beyond inputs and outputs (float32): CB (b, nchunks, g, CP, CP) and the states
(b, nchunks, h, p, n), as mamba_ssm, kept from the forward until the backward (mamba_ssm frees
them and recomputes them in its backward: keeping them trades memory for four recomputing
kernels, benchmarks/NOTES.md has the numbers); the backward adds one more states-sized buffer.
Under activation checkpointing the forward, and so these, run again.

Each pass is a `torch.library` custom op with a fake kernel and a registered autograd formula, so
torch.compile traces it without graph breaks. On CPU tensors the kernels run only under
TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.ssd import triton_bwd as bwd
from megatron_hybrid.kernels.ssd import triton_bwd_chunk as bwd_chunk
from megatron_hybrid.kernels.ssd import triton_fwd as fwd
from megatron_hybrid.kernels.ssd.eager import _check_args
from megatron_hybrid.kernels.triton_launch import check_inputs

_STATE_BLOCK = 1024  # state passing: elements of the p*n state per program
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Launch configuration on CUDA (benchmarks/ssd.py --sweep tries others): tiles of chunk positions
# for the forward scan and CB ("tile") and for the two big backward kernels ("bwd_tile"), warps
# per kernel ("<kernel>_warps", else "warps"), and software-pipelining stages where set
# ("<kernel>_stages", else Triton's default). Chosen by that sweep at headdim 64 / dstate 128,
# chunks of 128 and 256: the backward kernels hold more per position than the forward ones, so
# they run smaller tiles (32 positions; 64 run out of registers) and 4 warps rather than 8.
# The chunk backward's kernels, "chunk_dx" (with its own source/target tiles "chunk_dx_tile_m/k")
# and "chunk_db" (the "bwd_tile" tiles), are not timed yet: the dx kernel holds only dx's
# accumulator, so it starts at 64 x 64 tiles and 8 warps (mamba_ssm's dx kernel runs 64-128 x
# 32-64), which ptxas (sm_90, dstate 128) compiles to 241 registers and no stack; 4 warps or
# 128-position source tiles spill (512 / 232 bytes of stack).
# The measurements are in benchmarks/NOTES.md ("Launch configurations").
GPU_TUNING: dict[str, int] = {
    "tile": 64,
    "bwd_tile": 32,
    "warps": 4,
    "chunk_state_warps": 8,
    "chunk_scan_warps": 4,
    "bwd_warps": 4,
    "chunk_dx_tile_m": 64,
    "chunk_dx_tile_k": 64,
    "chunk_dx_warps": 8,
}


@dataclass(frozen=True)
class _Shape:
    """Sizes and launch configuration of one call."""

    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int
    chunk_size: int
    nchunks: int
    padded_len: int  # nchunks * chunk_size
    cp: int  # chunk positions, padded to a power of two >= 16
    bt: int  # tile of chunk positions: CB, chunk states, forward scan
    bt_bwd: int  # tile of chunk positions: backward source and target kernels
    bp: int  # headdim, padded
    bn: int  # dstate, padded
    block_h: int  # heads per chunk-cumsum program
    dot_dtype: object  # tl dtype of matmul operands
    interpret: bool
    cuda: bool

    @property
    def ntiles(self) -> int:
        return self.cp // self.bt

    @property
    def ntiles_bwd(self) -> int:
        return self.cp // self.bt_bwd

    @property
    def heads_per_group(self) -> int:
        return self.nheads // self.ngroups

    def launch(self, kernel: str = "") -> dict[str, int]:
        """num_warps (and num_stages where GPU_TUNING names them) of `kernel`'s launch."""
        if not self.cuda:
            return {"num_warps": 1}
        options = {"num_warps": GPU_TUNING.get(f"{kernel}_warps", GPU_TUNING["warps"])}
        if f"{kernel}_stages" in GPU_TUNING:
            options["num_stages"] = GPU_TUNING[f"{kernel}_stages"]
        return options


def _shape(x: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> _Shape:
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks = triton.cdiv(seqlen, chunk_size)
    cp = max(16, triton.next_power_of_2(chunk_size))
    cuda = x.device.type == "cuda"
    # Under the CPU interpreter small tiles, so that the tests' tiny chunks span several.
    bt, bt_bwd = (GPU_TUNING["tile"], GPU_TUNING["bwd_tile"]) if cuda else (16, 16)
    half = x.dtype in _TL_DTYPES and B.dtype == x.dtype and C.dtype == x.dtype
    return _Shape(
        batch=batch,
        seqlen=seqlen,
        nheads=nheads,
        headdim=headdim,
        ngroups=ngroups,
        dstate=dstate,
        chunk_size=chunk_size,
        nchunks=nchunks,
        padded_len=nchunks * chunk_size,
        cp=cp,
        bt=min(cp, bt),
        bt_bwd=min(cp, bt_bwd),
        bp=max(16, triton.next_power_of_2(headdim)),
        bn=max(16, triton.next_power_of_2(dstate)),
        block_h=min(8 if cuda else 16, triton.next_power_of_2(nheads)),
        dot_dtype=_TL_DTYPES[x.dtype] if half else tl.float32,
        interpret=not cuda and os.environ.get("TRITON_INTERPRET") == "1",
        cuda=cuda,
    )


@dataclass
class _Intermediates:
    """Forward intermediates that the backward reuses (saved from the forward)."""

    dt: Tensor  # (b, h, padded_len) processed dt
    da_cs: Tensor  # (b, h, padded_len) in-chunk cumsum of dt * A
    cb: Tensor  # (b, nchunks, g, cp, cp)
    states: Tensor  # (b, nchunks, h, p, n) state entering each chunk


def _has_limit(dt_min: float, dt_max: float) -> bool:
    return not (dt_min == 0.0 and dt_max == math.inf)


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _chunk_states(
    sh: _Shape,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: Tensor | None,
) -> tuple[_Intermediates, Tensor]:
    """Forward steps 1-4: processed dt and its cumsum, CB, the states entering the chunks, and
    the final states."""
    f32 = dict(dtype=torch.float32, device=x.device)
    dt_out = torch.empty(sh.batch, sh.nheads, sh.padded_len, **f32)
    da_cs = torch.empty_like(dt_out)
    fwd.chunk_cumsum_kernel[(sh.batch, sh.nchunks, triton.cdiv(sh.nheads, sh.block_h))](
        dt,
        A,
        dt_bias if dt_bias is not None else A,
        dt_out,
        da_cs,
        sh.seqlen,
        sh.nheads,
        sh.chunk_size,
        sh.padded_len,
        *_strides(dt),
        dt_min,
        dt_max,
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus,
        HAS_LIMIT=_has_limit(dt_min, dt_max),
        CP=sh.cp,
        BLOCK_H=sh.block_h,
        **sh.launch(),
    )
    cb = torch.empty(sh.batch, sh.nchunks, sh.ngroups, sh.cp, sh.cp, **f32)
    fwd.bmm_cb_kernel[(sh.batch * sh.nchunks * sh.ngroups, sh.ntiles)](
        B,
        C,
        cb,
        sh.seqlen,
        sh.chunk_size,
        sh.nchunks,
        sh.ngroups,
        sh.dstate,
        *_strides(B),
        *_strides(C),
        CP=sh.cp,
        BT=sh.bt,
        BN=sh.bn,
        DOT_DTYPE=sh.dot_dtype,
        INTERPRET=sh.interpret,
        **sh.launch(),
    )
    states = torch.empty(sh.batch, sh.nchunks, sh.nheads, sh.headdim, sh.dstate, **f32)
    _chunk_state(sh, x, B, dt_out, da_cs, states, to_end=True)
    final = torch.empty(sh.batch, sh.nheads, sh.headdim, sh.dstate, **f32)
    dim = sh.headdim * sh.dstate
    block = min(_STATE_BLOCK, triton.next_power_of_2(dim))
    fwd.state_passing_fwd_kernel[(sh.batch * sh.nheads, triton.cdiv(dim, block))](
        states,
        da_cs,
        initial_states if initial_states is not None else final,
        final,
        sh.nchunks,
        sh.nheads,
        sh.chunk_size,
        sh.padded_len,
        dim,
        HAS_INIT=initial_states is not None,
        BLOCK=block,
        **sh.launch(),
    )
    return _Intermediates(dt_out, da_cs, cb, states), final


def _chunk_state(
    sh: _Shape,
    x_or_dy: Tensor,
    b_or_c: Tensor,
    dt_out: Tensor,
    da_cs: Tensor,
    out: Tensor,
    to_end: bool,
) -> None:
    fwd.chunk_state_kernel[(sh.batch * sh.nchunks * sh.nheads,)](
        x_or_dy,
        b_or_c,
        dt_out,
        da_cs,
        out,
        sh.seqlen,
        sh.chunk_size,
        sh.nchunks,
        sh.nheads,
        sh.heads_per_group,
        sh.headdim,
        sh.dstate,
        sh.padded_len,
        *_strides(x_or_dy),
        *_strides(b_or_c),
        TO_END=to_end,
        CP=sh.cp,
        BK=sh.bt,
        BP=sh.bp,
        BN=sh.bn,
        DOT_DTYPE=sh.dot_dtype,
        INTERPRET=sh.interpret,
        **sh.launch("chunk_state"),
    )


def _saved_shapes(sh: _Shape) -> tuple[tuple[int, ...], ...]:
    """Shapes of the forward intermediates the backward reuses: dt, da_cs, cb, states."""
    per_step = (sh.batch, sh.nheads, sh.padded_len)
    return (
        per_step,
        per_step,
        (sh.batch, sh.nchunks, sh.ngroups, sh.cp, sh.cp),
        (sh.batch, sh.nchunks, sh.nheads, sh.headdim, sh.dstate),
    )


def _forward(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: Tensor | None,
) -> tuple[Tensor, ...]:
    """(y, final states, and the intermediates dt, da_cs, cb, states for the backward)."""
    sh = _shape(x, B, C, chunk_size)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if sh.seqlen == 0 or sh.batch == 0:
        final = x.new_zeros((sh.batch, sh.nheads, sh.headdim, sh.dstate), dtype=torch.float32)
        if initial_states is not None:
            final.copy_(initial_states)
        return (y, final, *(x.new_empty(shape, dtype=torch.float32) for shape in _saved_shapes(sh)))
    r, final = _chunk_states(
        sh, x, dt, A, B, C, dt_bias, dt_softplus, dt_min, dt_max, initial_states
    )
    fwd.chunk_scan_fwd_kernel[(sh.batch * sh.nchunks * sh.nheads, sh.ntiles)](
        x,
        C,
        r.cb,
        r.dt,
        r.da_cs,
        r.states,
        D if D is not None else A,
        y,
        sh.seqlen,
        sh.chunk_size,
        sh.nchunks,
        sh.nheads,
        sh.heads_per_group,
        sh.ngroups,
        sh.headdim,
        sh.dstate,
        sh.padded_len,
        *_strides(x),
        *_strides(C),
        *_strides(y)[:3],
        HAS_D=D is not None,
        D_PER_CHANNEL=D is not None and D.dim() == 2,
        CP=sh.cp,
        BT=sh.bt,
        BP=sh.bp,
        BN=sh.bn,
        DOT_DTYPE=sh.dot_dtype,
        INTERPRET=sh.interpret,
        **sh.launch("chunk_scan"),
    )
    return y, final, r.dt, r.da_cs, r.cb, r.states


@dataclass
class _Gradients:
    """The backward's outputs and per-step pieces that its source/target steps write."""

    dx: Tensor
    dB: Tensor
    dC: Tensor
    ddt_direct: Tensor  # (b, h, padded_len) the dt-as-factor part of ddt
    dda_to_end: Tensor  # (b, h, padded_len) V_s
    dda_readout: Tensor  # (b, h, padded_len) R_l
    dda_intra: Tensor  # (b, h, nchunks, ntiles_bwd, cp) per source tile
    dd_partial: Tensor  # dD per program, summed over dims (0, 1, 2); empty without D


def _bwd_sizes(sh: _Shape) -> tuple[int, ...]:
    """The size arguments that the source and target kernels share."""
    return (
        sh.seqlen,
        sh.chunk_size,
        sh.nchunks,
        sh.nheads,
        sh.heads_per_group,
        sh.ngroups,
        sh.headdim,
        sh.dstate,
        sh.padded_len,
    )


def _bwd_tiles(sh: _Shape, kernel: str) -> dict:
    return dict(
        CP=sh.cp,
        BT=sh.bt_bwd,
        BP=sh.bp,
        BN=sh.bn,
        DOT_DTYPE=sh.dot_dtype,
        INTERPRET=sh.interpret,
        **sh.launch(kernel),
    )


def _source_side_split(sh, dy, x, B, C, D, dstates, r, out: _Gradients) -> None:
    """Step 3, split variant: one program per (batch, chunk, group, source tile), the group's
    heads looped inside: dx, dB, dD, ddt_direct and the dda pieces V and intra."""
    if D is not None:
        out.dd_partial = torch.empty(
            sh.batch, sh.nchunks, sh.ntiles_bwd, sh.nheads, sh.headdim, **_f32(x)
        )
    bwd.chunk_scan_bwd_source_kernel[(sh.batch * sh.nchunks * sh.ngroups, sh.ntiles_bwd)](
        x,
        B,
        C,
        r.cb,
        r.dt,
        r.da_cs,
        dstates,
        D if D is not None else x,
        dy,
        out.dx,
        out.dB,
        out.ddt_direct,
        out.dda_to_end,
        out.dda_intra,
        out.dd_partial,
        *_bwd_sizes(sh),
        *_strides(x),
        *_strides(B),
        *_strides(C),
        *_strides(dy),
        *_strides(out.dx)[:3],
        *_strides(out.dB)[:3],
        HAS_D=D is not None,
        D_PER_CHANNEL=D is not None and D.dim() == 2,
        **_bwd_tiles(sh, "bwd"),
    )


def _source_side_chunk(sh, dy, x, B, C, D, dstates, r, out: _Gradients) -> None:
    """Step 3, chunk variant (kernels/ssd/triton_bwd_chunk.py): one program per (batch, chunk,
    head) for the whole chunk's dx, dD, ddt_direct and dda piece V; then per (batch, chunk,
    group, source tile) dB, with dCB summed over the group's heads before its matmul, and the
    dda piece intra from the same per-head tiles."""
    if D is not None:
        # One dD per (batch, chunk, head); the middle 1 keeps the split variant's sum.
        out.dd_partial = torch.empty(sh.batch, sh.nchunks, 1, sh.nheads, sh.headdim, **_f32(x))
    bwd_chunk.chunk_scan_bwd_dx_kernel[(sh.batch * sh.nchunks * sh.nheads,)](
        x,
        B,
        r.cb,
        r.dt,
        r.da_cs,
        dstates,
        D if D is not None else x,
        dy,
        out.dx,
        out.ddt_direct,
        out.dda_to_end,
        out.dd_partial,
        *_bwd_sizes(sh),
        *_strides(x),
        *_strides(B),
        *_strides(dy),
        *_strides(out.dx)[:3],
        HAS_D=D is not None,
        D_PER_CHANNEL=D is not None and D.dim() == 2,
        CP=sh.cp,
        BM=_chunk_dx_tile(sh, "m"),
        BK=_chunk_dx_tile(sh, "k"),
        BP=sh.bp,
        BN=sh.bn,
        BNS=min(sh.bn, _CHUNK_DX_STATE_SLICE if sh.cuda else 16),  # 16: tests run 2 slices
        DOT_DTYPE=sh.dot_dtype,
        INTERPRET=sh.interpret,
        **sh.launch("chunk_dx"),
    )
    bwd_chunk.chunk_scan_bwd_db_kernel[(sh.ntiles_bwd * sh.batch * sh.nchunks * sh.ngroups,)](
        x,
        C,
        r.cb,
        r.dt,
        r.da_cs,
        dstates,
        dy,
        out.dB,
        out.dda_intra,
        *_bwd_sizes(sh),
        *_strides(x),
        *_strides(C),
        *_strides(dy),
        *_strides(out.dB)[:3],
        HPG=triton.next_power_of_2(sh.heads_per_group),
        **_bwd_tiles(sh, "chunk_db"),
    )


# dstate per slice of the chunk dx kernel's state term (tl.dot needs >= 16): with the whole
# dstate of 128 in one dot ptxas (sm_90) spills 152 bytes at 64 x 32 tiles and 8 warps, with
# slices of 32 it spills none at the default 64 x 64 tiles.
_CHUNK_DX_STATE_SLICE = 32


def _chunk_dx_tile(sh: _Shape, dim: str) -> int:
    """Chunk positions per tile of the chunk backward's dx kernel: source ("m") or target ("k").
    Under the interpreter 32 and 16, so that the tests' chunks run unequal tiles."""
    tile = GPU_TUNING[f"chunk_dx_tile_{dim}"] if sh.cuda else {"m": 32, "k": 16}[dim]
    return min(sh.cp, tile)


def _target_side(sh, dy, x, B, C, r, out: _Gradients) -> None:
    """Step 4 (both variants): dC and the state readout's part R of the gradient of a."""
    bwd.chunk_scan_bwd_target_kernel[(sh.batch * sh.nchunks * sh.ngroups, sh.ntiles_bwd)](
        x,
        B,
        C,
        r.states,
        r.dt,
        r.da_cs,
        dy,
        out.dC,
        out.dda_readout,
        *_bwd_sizes(sh),
        *_strides(x),
        *_strides(B),
        *_strides(C),
        *_strides(dy),
        *_strides(out.dC)[:3],
        **_bwd_tiles(sh, "bwd"),
    )


def _f32(t: Tensor) -> dict:
    return dict(dtype=torch.float32, device=t.device)


_BWD_VARIANTS = {"split": _source_side_split, "chunk": _source_side_chunk}


def _bwd_variant_from_env() -> str:
    value = os.environ.get(BWD_ENV, "split")
    if value not in _BWD_VARIANTS:
        raise ValueError(
            f"{BWD_ENV}={value!r} (environment variable read by kernels/ssd/triton.py): "
            f"expected one of {sorted(_BWD_VARIANTS)}"
        )
    return value


# Which backward runs: "split" (kernels/ssd/triton_bwd.py: per group and source tile, heads looped
# inside, dB's CB part multiplied per head) or "chunk" (kernels/ssd/triton_bwd_chunk.py: dx per
# whole chunk and head, dB with dCB summed over a group's heads first). Read once at import from
# MEGATRON_HYBRID_SSD_BWD; benchmarks/ssd.py --bwd sets it per timed row.
BWD_ENV = "MEGATRON_HYBRID_SSD_BWD"
BWD_VARIANT = _bwd_variant_from_env()


def _backward(
    dy: Tensor,
    dfinal: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: Tensor | None,
    r: _Intermediates,
) -> tuple[Tensor, ...]:
    """(dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial) given the forward's intermediates `r`; an
    absent optional input gets an empty tensor (a new one each: custom ops return no aliases)."""
    sh = _shape(x, B, C, chunk_size)
    device = x.device
    f32 = dict(dtype=torch.float32, device=device)

    def absent() -> Tensor:
        return x.new_empty(0)

    dx = torch.empty(x.shape, dtype=x.dtype, device=device)
    ddt = torch.empty(dt.shape, dtype=dt.dtype, device=device)
    dB = torch.empty(B.shape, dtype=B.dtype, device=device)
    dC = torch.empty(C.shape, dtype=C.dtype, device=device)
    if sh.seqlen == 0 or sh.batch == 0:
        grads = [dx, ddt, torch.zeros_like(A), dB, dC]
        grads += [torch.zeros_like(t) if t is not None else absent() for t in (D, dt_bias)]
        grads.append(
            dfinal.to(initial_states.dtype, copy=True) if initial_states is not None else absent()
        )
        return tuple(grads)

    # 1-2: gradients of the states.
    dstates = torch.empty(sh.batch, sh.nchunks, sh.nheads, sh.headdim, sh.dstate, **f32)
    _chunk_state(sh, dy, C, r.dt, r.da_cs, dstates, to_end=False)
    dim = sh.headdim * sh.dstate
    block = min(_STATE_BLOCK, triton.next_power_of_2(dim))
    nblocks = triton.cdiv(dim, block)
    dinit = torch.empty(sh.batch, sh.nheads, sh.headdim, sh.dstate, **f32)
    dda_last = torch.empty(sh.batch, sh.nheads, sh.nchunks, nblocks, **f32)
    bwd.state_passing_bwd_kernel[(sh.batch * sh.nheads, nblocks)](
        dstates,
        r.states,
        r.da_cs,
        dfinal,
        dinit,
        dda_last,
        sh.nchunks,
        sh.nheads,
        sh.chunk_size,
        sh.padded_len,
        dim,
        BLOCK=block,
        **sh.launch(),
    )
    dda_last = dda_last.sum(-1).contiguous()

    # 3-4: dx, dB, dC, dD and the pieces of the gradient of dt * A.
    per_step = dict(size=(sh.batch, sh.nheads, sh.padded_len), **f32)
    out = _Gradients(
        dx=dx,
        dB=dB,
        dC=dC,
        ddt_direct=torch.empty(**per_step),
        dda_to_end=torch.empty(**per_step),
        dda_readout=torch.empty(**per_step),
        dda_intra=torch.zeros(sh.batch, sh.nheads, sh.nchunks, sh.ntiles_bwd, sh.cp, **f32),
        dd_partial=absent(),
    )
    _BWD_VARIANTS[BWD_VARIANT](sh, dy, x, B, C, D, dstates, r, out)
    _target_side(sh, dy, x, B, C, r, out)
    # 5: dt, A, dt_bias.
    da_partial = torch.empty(sh.batch, sh.nchunks, sh.nheads, **f32)
    dbias_partial = torch.empty_like(da_partial) if dt_bias is not None else absent()
    bwd.chunk_cumsum_bwd_kernel[(sh.batch, sh.nchunks, triton.cdiv(sh.nheads, sh.block_h))](
        dt,
        A,
        dt_bias if dt_bias is not None else A,
        r.dt,
        out.ddt_direct,
        out.dda_to_end,
        out.dda_intra,
        out.dda_readout,
        dda_last,
        ddt,
        da_partial,
        dbias_partial,
        sh.seqlen,
        sh.nheads,
        sh.chunk_size,
        sh.nchunks,
        sh.padded_len,
        *_strides(dt),
        *_strides(ddt)[:2],
        dt_min,
        dt_max,
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus,
        HAS_LIMIT=_has_limit(dt_min, dt_max),
        CP=sh.cp,
        NT=sh.ntiles_bwd,
        BLOCK_H=sh.block_h,
        **sh.launch(),
    )
    dA = da_partial.sum((0, 1)).to(A.dtype)
    dbias = dbias_partial.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else absent()
    if D is not None:
        dD = out.dd_partial.sum((0, 1, 2))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    else:
        dD = absent()
    dinit = dinit.to(initial_states.dtype) if initial_states is not None else absent()
    return dx, ddt, dA, dB, dC, dD, dbias, dinit


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("megatron_hybrid::ssd_chunked_scan", mutates_args=())
def _ssd_op(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        _contiguous(D),
        dt_bias,
        dt_softplus,
        dt_min,
        dt_max,
        _contiguous(initial_states),
    )


@_ssd_op.register_fake
def _(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_min, dt_max, initial_states):
    sh = _shape(x, B, C, chunk_size)
    return (
        x.new_empty(x.shape),
        x.new_empty((sh.batch, sh.nheads, sh.headdim, sh.dstate), dtype=torch.float32),
        *(x.new_empty(shape, dtype=torch.float32) for shape in _saved_shapes(sh)),
    )


@torch.library.custom_op("megatron_hybrid::ssd_chunked_scan_backward", mutates_args=())
def _ssd_backward_op(
    dy: Tensor,
    dfinal: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: Tensor | None,
    dt_out: Tensor,
    da_cs: Tensor,
    cb: Tensor,
    states: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r = _Intermediates(dt_out, da_cs, cb, states)
    return _backward(
        dy,
        dfinal.float().contiguous(),
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        _contiguous(D),
        dt_bias,
        dt_softplus,
        dt_min,
        dt_max,
        _contiguous(initial_states),
        r,
    )


@_ssd_backward_op.register_fake
def _(
    dy,
    dfinal,
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D,
    dt_bias,
    dt_softplus,
    dt_min,
    dt_max,
    initial_states,
    dt_out,
    da_cs,
    cb,
    states,
):
    return (
        x.new_empty(x.shape),
        dt.new_empty(dt.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        *(
            t.new_empty(t.shape) if t is not None else x.new_empty(0)
            for t in (D, dt_bias, initial_states)
        ),
    )


def _contiguous(t: Tensor | None) -> Tensor | None:
    return t.contiguous() if t is not None else None


def _setup(ctx, inputs, output):
    (x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_min, dt_max, initial_states) = inputs
    intermediates = output[2:]
    ctx.mark_non_differentiable(*intermediates)
    # Unused outputs get None, not materialized zero gradients: zero-filling the states-sized
    # gradient of the saved states would cost a pass over them (`_grad` handles None).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_states, *intermediates)
    ctx.options = (chunk_size, dt_softplus, dt_min, dt_max)


def _grad(ctx, dy, dfinal, *_intermediates):
    x, dt, A, B, C, D, dt_bias, initial_states, *intermediates = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max = ctx.options
    if dfinal is None:
        dfinal = x.new_zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[-1]), dtype=torch.float32)
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dbias, dinit = _ssd_backward_op(
        dy,
        dfinal,
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D,
        dt_bias,
        dt_softplus,
        dt_min,
        dt_max,
        initial_states,
        *intermediates,
    )
    return (
        dx,
        ddt,
        dA,
        dB,
        dC,
        None,
        dD if D is not None else None,
        dbias if dt_bias is not None else None,
        None,
        None,
        None,
        dinit if initial_states is not None else None,
    )


_ssd_op.register_autograd(_grad, setup_context=_setup)


# -- public function (the registry's `triton` implementation) -------------------------------------


def ssd_chunked_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba2's chunked selective scan in Triton; the arguments, shapes, results and errors of
    kernels/ssd/eager.py::ssd_chunked_scan (mamba_ssm's `mamba_chunk_scan_combined`).

    Args:
        x: (batch, seqlen, nheads, headdim); any strides (e.g. a view of a packed projection).
        dt: (batch, seqlen, nheads); `dt + dt_bias`, then softplus if `dt_softplus`, then
            clamped to `dt_limit` unless that is (0, inf).
        A: (nheads,).
        B, C: (batch, seqlen, ngroups, dstate); head h reads group h // (nheads // ngroups).
        chunk_size: positive; seqlen need not be a multiple of it.
        D: optional skip, (nheads,) or (nheads, headdim).
        dt_bias: optional (nheads,).
        initial_states: optional (batch, nheads, headdim, dstate).
        return_final_states: also return the state after the last step.

    Returns:
        y (batch, seqlen, nheads, headdim) in x's dtype, and with `return_final_states` the final
        states (batch, nheads, headdim, dstate) in float32. Differentiable in every tensor.

    Raises:
        ValueError: as the eager op for shapes, chunk_size and dt_limit; and for dtypes other than
            float32, bfloat16 and float16, or CPU tensors outside Triton's interpreter.
    """
    _check_args(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_states)
    optional = dict(D=D, dt_bias=dt_bias, initial_states=initial_states)
    check_inputs(
        "ssd",
        x=x,
        dt=dt,
        A=A,
        B=B,
        C=C,
        **{name: t for name, t in optional.items() if t is not None},
    )
    y, final, *_ = _ssd_op(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D,
        dt_bias,
        dt_softplus,
        float(dt_limit[0]),
        float(dt_limit[1]),
        initial_states,
    )
    return (y, final) if return_final_states else y
