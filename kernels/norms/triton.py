"""Triton RMSNorm family, forward and backward: plain, gated grouped (Mamba2), and fused
residual-add + RMSNorm. The eager references are in kernels/norms/eager.py.

All three are one forward kernel and one backward kernel with compile-time switches, over a
(rows, channels) view whose channels split into groups of `group_size` (plain RMSNorm: one group
of all channels). Program (i, g) handles a block of rows of group g; statistics, gates and
gradients are computed in float32 and rounded once into the output dtype. The backward
recomputes `rstd` from the saved input (it loads the whole row anyway), so forward saves no
statistics. The weight gradient is summed per program in float32, then over programs in torch.

Each function is a `torch.library` custom op with a fake kernel and a registered autograd
formula whose backward is itself a custom op, so `torch.compile` traces through them without
graph breaks. On CPU tensors they run only under TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.triton_launch import check_inputs, rows_view

_MAX_GROUP = 65536  # one row group is held in registers


@triton.jit
def _norm_fwd_kernel(
    X,
    GATE,
    RES,
    W,
    Y,
    SUM,
    n_rows,
    group_size,
    stride_x,
    stride_gate,
    stride_res,
    stride_y,
    stride_sum,
    eps,
    HAS_GATE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    local = tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * group_size + local
    col_ok = local < group_size
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    h = h.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        # Normalize the sum as stored (rounded to its dtype), as the eager reference does and
        # as the backward, which reloads it, will see it.
        s = (h + r.to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + rows[:, None] * stride_sum + cols[None, :], s, mask=mask)
        h = s.to(tl.float32)
    if HAS_GATE:
        g = tl.load(GATE + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        h = h * (g * tl.sigmoid(g))
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / group_size + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_loads(
    DY,
    X,
    GATE,
    DSUM,
    rows,
    row_end,
    cols,
    col_ok,
    stride_dy,
    stride_x,
    stride_gate,
    stride_dsum,
    HAS_GATE: tl.constexpr,
    HAS_DSUM: tl.constexpr,
):
    """The backward's inputs at `rows` (x, gate, dy, dsum; x stands in for an absent gate or
    dsum), in their own dtypes."""
    mask = (rows < row_end)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    g = x
    if HAS_GATE:
        g = tl.load(GATE + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0)
    ds = x
    if HAS_DSUM:
        ds = tl.load(DSUM + rows[:, None] * stride_dsum + cols[None, :], mask=mask, other=0.0)
    return x, g, dy, ds


@triton.jit
def _norm_bwd_kernel(
    DY,
    X,
    GATE,
    W,
    DSUM,
    DX,
    DGATE,
    DW_PARTIAL,
    n_rows,
    group_size,
    channels,
    rows_per_program,
    stride_dy,
    stride_x,
    stride_gate,
    stride_dsum,
    stride_dx,
    stride_dgate,
    eps,
    HAS_GATE: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * group_size + local
    col_ok = local < group_size
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    rows = (row_begin + tl.arange(0, BLOCK_M)).to(tl.int64)
    x_next, g_next, dy_next, ds_next = _bwd_loads(
        DY,
        X,
        GATE,
        DSUM,
        rows,
        row_end,
        cols,
        col_ok,
        stride_dy,
        stride_x,
        stride_gate,
        stride_dsum,
        HAS_GATE,
        HAS_DSUM,
    )
    for start in range(row_begin, row_end, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        x, g, dy, ds = x_next, g_next, dy_next, ds_next
        # The next tile's loads are in flight while this one computes (a program walks its
        # rows one tile after another; without this each tile would wait for its own loads).
        x_next, g_next, dy_next, ds_next = _bwd_loads(
            DY,
            X,
            GATE,
            DSUM,
            rows + BLOCK_M,
            row_end,
            cols,
            col_ok,
            stride_dy,
            stride_x,
            stride_gate,
            stride_dsum,
            HAS_GATE,
            HAS_DSUM,
        )
        x = x.to(tl.float32)
        h = x
        if HAS_GATE:
            g = g.to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            h = x * silu
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / group_size + eps)
        h_hat = h * rstd[:, None]
        dy = dy.to(tl.float32)
        dw += tl.sum(dy * h_hat, axis=0)
        dy_w = dy * w[None, :]
        # d/dh of h * rstd(h): rstd * (dy_w - h_hat * mean(dy_w * h_hat)).
        dh = (dy_w - h_hat * (tl.sum(dy_w * h_hat, axis=1) / group_size)[:, None]) * rstd[:, None]
        dx = dh
        if HAS_GATE:
            dx = dh * silu
            dg = dh * x * sig * (1.0 + g * (1.0 - sig))
            tl.store(
                DGATE + rows[:, None] * stride_dgate + cols[None, :],
                dg.to(DGATE.dtype.element_ty),
                mask=mask,
            )
        if HAS_DSUM:
            dx += ds.to(tl.float32)
        tl.store(
            DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask
        )
    tl.store(DW_PARTIAL + pid * channels + cols, dw, mask=col_ok)


# -- launchers ------------------------------------------------------------------------------------

# Launch configuration on CUDA (benchmarks/sweep_kernels.py tries others): elements of a
# (rows, group) tile, elements per warp, and backward programs per multiprocessor (each walks
# a stretch of rows and writes one float32 weight-gradient partial). The forward; the backward
# of the plain and residual-add norms ("bwd_"), whose groups are whole rows of the hidden size;
# and the gated norm's backward ("gated_bwd_"), whose groups are a fraction of a row.
# Chosen by that sweep at hybrid-1b's shapes: the forward, one tile per program, is near the
# copy bandwidth with large tiles. The backward loop waits on each tile's loads, and every
# program's partial must be summed afterwards: whole rows run best as two-row tiles of 8 warps,
# 2 programs per multiprocessor (a quarter of the partials of 8 small programs, as many warps);
# the gated norm's short groups as small 1024-element programs, 8 per multiprocessor (two-row
# tiles are 1.6x slower there). The measurements are in benchmarks/NOTES.md.
GPU_TUNING: dict[str, int] = {
    "tile": 4096,
    "per_warp": 512,
    "bwd_tile": 4096,
    "bwd_per_warp": 512,
    "bwd_programs_per_sm": 2,
    "gated_bwd_tile": 1024,
    "gated_bwd_per_warp": 1024,
    "gated_bwd_programs_per_sm": 8,
}


def _blocks(
    group_size: int, pass_: str = "", cuda: bool = True, itemsize: int = 2
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward (`pass_` "") or a backward ("bwd_",
    "gated_bwd_") kernel: a whole group in BLOCK_N, as many rows as fit the tile. The backward
    holds the next tile's inputs in registers too, so its elements per warp are for 2-byte
    inputs and halve for 4-byte ones (float32 residual streams under autocast)."""
    tile, per_warp = (
        (GPU_TUNING[f"{pass_}tile"], GPU_TUNING[f"{pass_}per_warp"]) if cuda else (4096, 512)
    )
    if pass_.endswith("bwd_"):
        per_warp = max(32, per_warp * 2 // itemsize)
    block_n = triton.next_power_of_2(group_size)
    block_m = max(1, min(64, tile // block_n))
    num_warps = min(16, max(1, block_m * block_n // per_warp))
    return block_m, block_n, num_warps


def _num_programs(device: torch.device, row_blocks: int, ngroups: int, pass_: str) -> int:
    """Backward programs per group: enough to fill the GPU, few enough that the float32 weight
    partials stay small. Under the CPU interpreter each program is a Python loop iteration."""
    if device.type == "cuda":
        target = (
            GPU_TUNING[f"{pass_}programs_per_sm"]
            * torch.cuda.get_device_properties(device).multi_processor_count
        )
        return max(1, min(row_blocks, triton.cdiv(target, ngroups)))
    return max(1, min(row_blocks, 2))


def _forward(
    x: Tensor,
    gate: Tensor | None,
    residual: Tensor | None,
    weight: Tensor,
    group_size: int,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None]:
    channels = x.shape[-1]
    x2 = rows_view(x)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y2 = y.view(-1, channels)
    gate2 = rows_view(gate) if gate is not None else x2
    res2 = rows_view(residual) if residual is not None else x2
    total = torch.empty(x.shape, dtype=out_dtype, device=x.device) if residual is not None else None
    total2 = total.view(-1, channels) if total is not None else y2
    n_rows = x2.shape[0]
    if n_rows == 0:
        return y, total
    block_m, block_n, num_warps = _blocks(group_size, "", x.device.type == "cuda")
    grid = (triton.cdiv(n_rows, block_m), channels // group_size)
    _norm_fwd_kernel[grid](
        x2,
        gate2,
        res2,
        weight,
        y2,
        total2,
        n_rows,
        group_size,
        x2.stride(0),
        gate2.stride(0),
        res2.stride(0),
        y2.stride(0),
        total2.stride(0),
        eps,
        HAS_GATE=gate is not None,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, total


def _backward_launch(
    device: torch.device, n_rows: int, group_size: int, ngroups: int, itemsize: int, gated: bool
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs per group, rows per program) of the backward."""
    pass_ = "gated_bwd_" if gated else "bwd_"
    block_m, block_n, num_warps = _blocks(group_size, pass_, device.type == "cuda", itemsize)
    programs = _num_programs(device, triton.cdiv(max(n_rows, 1), block_m), ngroups, pass_)
    rows_per_program = triton.cdiv(triton.cdiv(max(n_rows, 1), programs), block_m) * block_m
    return block_m, block_n, num_warps, programs, rows_per_program


def _backward(
    dy: Tensor,
    x: Tensor,
    gate: Tensor | None,
    weight: Tensor,
    group_size: int,
    eps: float,
    dsum: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    channels = x.shape[-1]
    dy2, x2 = rows_view(dy), rows_view(x)
    gate2 = rows_view(gate) if gate is not None else x2
    dsum2 = rows_view(dsum) if dsum is not None else x2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, channels)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=x.device) if gate is not None else None
    dgate2 = dgate.view(-1, channels) if dgate is not None else dx2
    n_rows = x2.shape[0]
    ngroups = channels // group_size
    itemsize = max(
        x.element_size(), dy.element_size(), gate.element_size() if gate is not None else 0
    )
    block_m, block_n, num_warps, programs, rows_per_program = _backward_launch(
        x.device, n_rows, group_size, ngroups, itemsize, gated=gate is not None
    )
    # Every program writes its row of partials (zeros when it has no rows): no fill needed.
    partial = torch.empty(programs, channels, dtype=torch.float32, device=x.device)
    if n_rows:
        _norm_bwd_kernel[(programs, ngroups)](
            dy2,
            x2,
            gate2,
            weight,
            dsum2,
            dx2,
            dgate2,
            partial,
            n_rows,
            group_size,
            channels,
            rows_per_program,
            dy2.stride(0),
            x2.stride(0),
            gate2.stride(0),
            dsum2.stride(0),
            dx2.stride(0),
            dgate2.stride(0),
            eps,
            HAS_GATE=gate is not None,
            HAS_DSUM=dsum is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return dx, dgate, partial.sum(0).to(weight.dtype)


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("megatron_hybrid::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _forward(x, None, None, weight, x.shape[-1], eps, x.dtype)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("megatron_hybrid::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    dx, _, dw = _backward(dy, x, None, weight, x.shape[-1], eps, None)
    return dx, dw


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, weight, ctx.eps)
    return dx, dw, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


@torch.library.custom_op("megatron_hybrid::gated_rms_norm", mutates_args=())
def _gated_rms_norm_op(
    x: Tensor, gate: Tensor, weight: Tensor, group_size: int, eps: float
) -> Tensor:
    return _forward(x, gate, None, weight, group_size, eps, x.dtype)[0]


@_gated_rms_norm_op.register_fake
def _(x, gate, weight, group_size, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("megatron_hybrid::gated_rms_norm_backward", mutates_args=())
def _gated_rms_norm_backward_op(
    dy: Tensor, x: Tensor, gate: Tensor, weight: Tensor, group_size: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, x, gate, weight, group_size, eps, None)


@_gated_rms_norm_backward_op.register_fake
def _(dy, x, gate, weight, group_size, eps):
    return x.new_empty(x.shape), gate.new_empty(gate.shape), weight.new_empty(weight.shape)


def _gated_setup(ctx, inputs, output):
    x, gate, weight, group_size, eps = inputs
    ctx.save_for_backward(x, gate, weight)
    ctx.group_size, ctx.eps = group_size, eps


def _gated_grad(ctx, dy):
    x, gate, weight = ctx.saved_tensors
    dx, dgate, dw = _gated_rms_norm_backward_op(dy, x, gate, weight, ctx.group_size, ctx.eps)
    return dx, dgate, dw, None, None


_gated_rms_norm_op.register_autograd(_gated_grad, setup_context=_gated_setup)


@torch.library.custom_op("megatron_hybrid::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return _forward(x, None, residual, weight, x.shape[-1], eps, dtype)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("megatron_hybrid::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward_op(
    dy: Tensor, dsum: Tensor, total: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    dtotal, _, dw = _backward(dy, total, None, weight, total.shape[-1], eps, dsum)
    return dtotal, dw


@_add_rms_norm_backward_op.register_fake
def _(dy, dsum, total, weight, eps):
    return total.new_empty(total.shape), weight.new_empty(weight.shape)


def _add_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps, ctx.x_dtype, ctx.residual_dtype = eps, x.dtype, residual.dtype


def _add_grad(ctx, dy, dsum):
    total, weight = ctx.saved_tensors
    if dsum is None:
        dsum = torch.zeros_like(total)
    dtotal, dw = _add_rms_norm_backward_op(dy, dsum, total, weight, ctx.eps)
    return dtotal.to(ctx.x_dtype), dtotal.to(ctx.residual_dtype), dw, None


_add_rms_norm_op.register_autograd(_add_grad, setup_context=_add_setup)


# -- public functions (the registry's `triton` implementations) -----------------------------------


def _check(name: str, x: Tensor, weight: Tensor, group_size: int, **same_shape: Tensor) -> None:
    channels = x.shape[-1] if x.dim() else 0
    check_inputs(name, x=x, **same_shape, weight=weight)
    for tensor_name, tensor in same_shape.items():
        if tensor.shape != x.shape:
            raise ValueError(
                f"{name} (triton): {tensor_name} has shape {tuple(tensor.shape)}, "
                f"x has {tuple(x.shape)}; they must match"
            )
    if weight.shape != (channels,):
        raise ValueError(
            f"{name} (triton): weight has shape {tuple(weight.shape)}, expected "
            f"({channels},) for x of shape {tuple(x.shape)}"
        )
    if group_size <= 0 or channels % group_size or group_size > _MAX_GROUP:
        raise ValueError(
            f"{name} (triton): group_size {group_size} must divide the "
            f"{channels} channels and be at most {_MAX_GROUP}"
        )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dim, in x's dtype."""
    _check("rms_norm", x, weight, x.shape[-1])
    return _rms_norm_op(x, weight, eps)


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """Mamba2's norm: `rms_norm(x * silu(gate))` with statistics per group of `group_size`."""
    _check("gated_rms_norm", x, weight, group_size, gate=gate)
    return _gated_rms_norm_op(x, gate, weight, group_size, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`(rms_norm(residual + x), residual + x)` in one pass, in the promoted dtype."""
    _check("add_rms_norm", x, weight, x.shape[-1], residual=residual)
    return _add_rms_norm_op(x, residual, weight, eps)
