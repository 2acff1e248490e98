"""Chunked SSD (Mamba2's state space dual) in plain PyTorch: the eager reference and CPU path.

The recurrence, per batch b and head h, with `dA_t = exp(dt_t * A_h)`:

    state_t = dA_t * state_{t-1} + dt_t * outer(x_t, B_t)      (headdim x dstate)
    y_t     = state_t @ C_t + D_h * x_t

is evaluated chunk by chunk as in the minimal SSD of the Mamba2 paper (Dao & Gu, 2024, listing 1):
a masked quadratic form inside each chunk, the end-of-chunk states, a segment-sum pass that
carries states across chunks, and the carried states read out by C. Everything is batched tensor
ops; no Python loop runs over time or over chunks.

Shape letters: b batch, c chunk, l and s positions inside a chunk (target and source), z chunk
boundary, g B/C group, r head inside its group (nheads = ngroups * r), p headdim, n dstate.
B and C are never copied per head with repeat_interleave: C.B is computed once per group, and the
state matmuls broadcast B and C over a group's heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_DT_LIMIT = (0.0, math.inf)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums of the last dim: `out[..., i, j] = x[..., j+1] + ... + x[..., i]` for
    `i >= j` (so the diagonal is 0) and `-inf` above the diagonal, so `exp(out)` is the
    lower-triangular decay matrix. Sums by a masked cumsum rather than a difference of
    cumsums, which would cancel catastrophically when the sums are large."""
    T = x.size(-1)
    x_TT = x.unsqueeze(-1).expand(*x.shape, T)  # [..., i, j] = x[..., i]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x_TT = x_TT.masked_fill(~strictly_lower, 0.0)
    sums = torch.cumsum(x_TT, dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(0)
    return sums.masked_fill(~lower, -math.inf)


def process_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """The step sizes the scan uses: `dt + dt_bias`, then `softplus` if `dt_softplus`, then
    clamped to `dt_limit` unless that is (0, inf), in `compute_dtype`. (The decoding step,
    kernels/ssd_step/eager.py, and a prefill that masks padded steps apply the same.)"""
    dt = dt.to(compute_dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute_dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _check_args(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_states) -> None:
    def fail(name: str, tensor: torch.Tensor, expected: str) -> None:
        raise ValueError(
            f"ssd_chunked_scan: {name} has shape {tuple(tensor.shape)}, expected {expected}"
        )

    if x.dim() != 4:
        fail("x", x, "(batch, seqlen, nheads, headdim)")
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads):
        fail("dt", dt, f"(batch, seqlen, nheads) = {(batch, seqlen, nheads)} to match x")
    if A.shape != (nheads,):
        fail("A", A, f"(nheads,) = {(nheads,)}")
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen):
        fail("B", B, f"(batch, seqlen, ngroups, dstate) with batch, seqlen = {(batch, seqlen)}")
    if C.shape != B.shape:
        fail("C", C, f"B's shape {tuple(B.shape)}")
    ngroups, dstate = B.shape[2:]
    if ngroups == 0 or nheads % ngroups != 0:
        raise ValueError(
            f"ssd_chunked_scan: nheads ({nheads}, from x {tuple(x.shape)}) must be a multiple "
            f"of ngroups ({ngroups}, from B {tuple(B.shape)})"
        )
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        fail("D", D, f"(nheads,) = {(nheads,)} or (nheads, headdim) = {(nheads, headdim)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        fail("dt_bias", dt_bias, f"(nheads,) = {(nheads,)}")
    state_shape = (batch, nheads, headdim, dstate)
    if initial_states is not None and initial_states.shape != state_shape:
        fail("initial_states", initial_states, f"(batch, nheads, headdim, dstate) = {state_shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"ssd_chunked_scan: chunk_size must be a positive int, got {chunk_size!r}")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(
            f"ssd_chunked_scan: dt_limit must be (low, high) with low <= high, got {dt_limit!r}"
        )


def ssd_chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's selective scan, same arguments as mamba_ssm's `mamba_chunk_scan_combined`.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads); transformed as `dt + dt_bias`, then `softplus` if
            `dt_softplus`, then clamped to `dt_limit` unless that is (0, inf).
        A: (nheads,), negative (not checked; positive A makes the decays grow).
        B, C: (batch, seqlen, ngroups, dstate); head h reads group `h // (nheads // ngroups)`.
        chunk_size: positive; seqlen need not be a multiple of it.
        D: optional skip, (nheads,) or (nheads, headdim).
        dt_bias: optional (nheads,).
        initial_states: optional (batch, nheads, headdim, dstate) state before position 0.
        return_final_states: also return the state after the last position.

    Returns:
        y (batch, seqlen, nheads, headdim) in x's dtype, and with `return_final_states` the final
        states (batch, nheads, headdim, dstate) in the compute dtype. The compute dtype is float32,
        or float64 when any of x, dt, A, B, C is float64; half inputs are upcast.
        Differentiable in every tensor argument.

    Memory: O(batch * nheads * seqlen * chunk_size) for the intra-chunk part and
    O(batch * nheads * nchunks^2) for carrying states across chunks.

    Raises:
        ValueError: a tensor of the wrong shape (the message names it and its shape),
            nheads not a multiple of ngroups, chunk_size not a positive int, or a bad dt_limit.
    """
    _check_args(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, initial_states)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    heads_per_group = nheads // ngroups
    compute_dtype = torch.float32
    for t in (x, dt, A, B, C):
        compute_dtype = torch.promote_types(compute_dtype, t.dtype)

    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, compute_dtype)

    # Padded steps get dt = 0 (decay 1, no input) and x = B = C = 0, so they neither change the
    # final state nor the real outputs; their outputs are sliced off.
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen
    x_BLHP = x.to(compute_dtype)
    x_pad, dt_pad, B_pad, C_pad = x_BLHP, dt, B.to(compute_dtype), C.to(compute_dtype)
    if pad:
        x_pad = F.pad(x_pad, (0, 0, 0, 0, 0, pad))
        dt_pad = F.pad(dt_pad, (0, 0, 0, pad))
        B_pad = F.pad(B_pad, (0, 0, 0, 0, 0, pad))
        C_pad = F.pad(C_pad, (0, 0, 0, 0, 0, pad))

    # Work head-major, (batch, group, head-in-group, chunk, position, ...), so every matmul
    # below runs as one bmm over contiguous leading dims.
    chunked = (batch, nchunks, chunk_size)
    x_bgrclp = x_pad.view(*chunked, ngroups, heads_per_group, headdim).permute(0, 3, 4, 1, 2, 5)
    dt_bgrcl = dt_pad.view(*chunked, ngroups, heads_per_group).permute(0, 3, 4, 1, 2).contiguous()
    B_bgcln = B_pad.view(*chunked, ngroups, dstate).permute(0, 3, 1, 2, 4).contiguous()
    C_bgcln = C_pad.view(*chunked, ngroups, dstate).permute(0, 3, 1, 2, 4).contiguous()
    A_gr11 = A.to(compute_dtype).view(ngroups, heads_per_group, 1, 1)

    # dt first: the product takes the layout of its first operand with real strides, so this
    # is the one copy of x into head-major order.
    xdt_bgrclp = dt_bgrcl.unsqueeze(-1) * x_bgrclp
    dA_bgrcl = dt_bgrcl * A_gr11
    dA_cumsum_bgrcl = torch.cumsum(dA_bgrcl, dim=-1)

    # 1. Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) * exp(dA_{s+1} + ... + dA_l) * xdt_s.
    CB_bgcls = C_bgcln @ B_bgcln.transpose(-1, -2)
    scores_bgrcls = CB_bgcls.unsqueeze(2) * torch.exp(segsum(dA_bgrcl))
    y_bgrclp = scores_bgrcls @ xdt_bgrclp

    # 2. Each chunk's own contribution to the state at its end, as if it started from zero.
    decay_to_end_bgrcl = torch.exp(dA_cumsum_bgrcl[..., -1:] - dA_cumsum_bgrcl)
    xdt_to_end_bgrcpl = (decay_to_end_bgrcl.unsqueeze(-1) * xdt_bgrclp).transpose(-1, -2)
    chunk_states_bgrcpn = xdt_to_end_bgrcpl @ B_bgcln.unsqueeze(2)

    # 3. Carry states across chunks: boundary z holds the state before chunk z (z = 0 is the
    # initial state, z = nchunks the final one).
    if initial_states is None:
        initial_bgrpn = chunk_states_bgrcpn.new_zeros(
            batch, ngroups, heads_per_group, headdim, dstate
        )
    else:
        initial_bgrpn = initial_states.to(compute_dtype).view(
            batch, ngroups, heads_per_group, headdim, dstate
        )
    states_bgrcpn = torch.cat([initial_bgrpn.unsqueeze(3), chunk_states_bgrcpn], dim=3)
    carry_bgrzc = torch.exp(segsum(F.pad(dA_cumsum_bgrcl[..., -1], (1, 0))))
    boundary_bgrzpn = (carry_bgrzc @ states_bgrcpn.flatten(-2)).unflatten(-1, (headdim, dstate))
    state_in_bgrcpn = boundary_bgrzpn[:, :, :, :-1]
    final_bgrpn = boundary_bgrzpn[:, :, :, -1]

    # 4. Read out each chunk's incoming state, decayed from the chunk start to position l.
    y_off_bgrclp = C_bgcln.unsqueeze(2) @ state_in_bgrcpn.transpose(-1, -2)
    y_bgrclp = y_bgrclp + torch.exp(dA_cumsum_bgrcl).unsqueeze(-1) * y_off_bgrclp

    y_BLHP = y_bgrclp.reshape(batch, nheads, nchunks * chunk_size, headdim).transpose(1, 2)
    y_BLHP = y_BLHP[:, :seqlen]
    if D is None:
        y_BLHP = y_BLHP.contiguous()
    else:
        D_HP = D.to(compute_dtype)
        # x first, so the sum comes out contiguous in x's (batch, seqlen, nheads, headdim) order.
        y_BLHP = x_BLHP * (D_HP if D_HP.dim() == 2 else D_HP.unsqueeze(-1)) + y_BLHP
    y_BLHP = y_BLHP.to(x.dtype)
    if not return_final_states:
        return y_BLHP
    # A copy, not a view of the boundary states: a decoding state stays compact and does not
    # keep every chunk's boundary alive.
    return y_BLHP, final_bgrpn.reshape(batch, nheads, headdim, dstate).contiguous()
