"""Triton MLP activations, forward and backward: squared ReLU `relu(h)^2` and SwiGLU
`silu(h[..., :F]) * h[..., F:]` (fc1 packs [gate; up]; the eager references are in
kernels/activations/eager.py).

Math in float32, one rounding into the input dtype. Each function is a `torch.library` custom
op with a fake kernel and an autograd formula whose backward is itself a custom op, so
`torch.compile` traces through them without graph breaks. On CPU tensors they run only under
TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.triton_launch import check_inputs, rows_view

_BLOCK = 4096  # elements per program for the elementwise kernels


@triton.jit
def _squared_relu_fwd_kernel(H, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(h, 0.0)
    tl.store(Y + offs, (r * r).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _squared_relu_bwd_kernel(DY, H, DH, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DH + offs, (2.0 * tl.maximum(h, 0.0) * dy).to(DH.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fwd_kernel(
    H, Y, n_rows, width, stride_h, stride_y, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < width)[None, :]
    gate_ptr = H + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + width, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,
    H,
    DH,
    n_rows,
    width,
    stride_dy,
    stride_h,
    stride_dh,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < width)[None, :]
    gate_ptr = H + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + width, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dy * gate * sig
    dgate_ptr = DH + rows[:, None] * stride_dh + cols[None, :]
    tl.store(dgate_ptr, dgate.to(DH.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + width, dup.to(DH.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------------


def _swiglu_blocks(width: int) -> tuple[int, int]:
    block_f = min(1024, triton.next_power_of_2(width))
    return max(1, min(64, _BLOCK // block_f)), block_f


def _squared_relu_forward(h: Tensor) -> Tensor:
    h = h.contiguous()
    y = torch.empty_like(h)
    if h.numel():
        _squared_relu_fwd_kernel[(triton.cdiv(h.numel(), _BLOCK),)](h, y, h.numel(), BLOCK=_BLOCK)
    return y


def _squared_relu_backward(dy: Tensor, h: Tensor) -> Tensor:
    h, dy = h.contiguous(), dy.contiguous()
    dh = torch.empty_like(h)
    if h.numel():
        _squared_relu_bwd_kernel[(triton.cdiv(h.numel(), _BLOCK),)](
            dy, h, dh, h.numel(), BLOCK=_BLOCK
        )
    return dh


def _swiglu_forward(h: Tensor) -> Tensor:
    width = h.shape[-1] // 2
    h2 = rows_view(h)
    y = torch.empty(*h.shape[:-1], width, dtype=h.dtype, device=h.device)
    y2 = y.view(-1, width)
    if y.numel():
        block_m, block_f = _swiglu_blocks(width)
        grid = (triton.cdiv(h2.shape[0], block_m), triton.cdiv(width, block_f))
        _swiglu_fwd_kernel[grid](
            h2, y2, h2.shape[0], width, h2.stride(0), y2.stride(0), BLOCK_M=block_m, BLOCK_F=block_f
        )
    return y


def _swiglu_backward(dy: Tensor, h: Tensor) -> Tensor:
    width = h.shape[-1] // 2
    h2, dy2 = rows_view(h), rows_view(dy)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    dh2 = dh.view(-1, 2 * width)
    if dh.numel():
        block_m, block_f = _swiglu_blocks(width)
        grid = (triton.cdiv(h2.shape[0], block_m), triton.cdiv(width, block_f))
        _swiglu_bwd_kernel[grid](
            dy2,
            h2,
            dh2,
            h2.shape[0],
            width,
            dy2.stride(0),
            h2.stride(0),
            dh2.stride(0),
            BLOCK_M=block_m,
            BLOCK_F=block_f,
        )
    return dh


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("megatron_hybrid::squared_relu", mutates_args=())
def _squared_relu_op(h: Tensor) -> Tensor:
    return _squared_relu_forward(h)


@_squared_relu_op.register_fake
def _(h):
    return h.new_empty(h.shape)


@torch.library.custom_op("megatron_hybrid::squared_relu_backward", mutates_args=())
def _squared_relu_backward_op(dy: Tensor, h: Tensor) -> Tensor:
    return _squared_relu_backward(dy, h)


@_squared_relu_backward_op.register_fake
def _(dy, h):
    return h.new_empty(h.shape)


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _squared_relu_grad(ctx, dy):
    (h,) = ctx.saved_tensors
    return _squared_relu_backward_op(dy, h)


_squared_relu_op.register_autograd(_squared_relu_grad, setup_context=_save_input)


@torch.library.custom_op("megatron_hybrid::swiglu", mutates_args=())
def _swiglu_op(h: Tensor) -> Tensor:
    return _swiglu_forward(h)


@_swiglu_op.register_fake
def _(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("megatron_hybrid::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: Tensor, h: Tensor) -> Tensor:
    return _swiglu_backward(dy, h)


@_swiglu_backward_op.register_fake
def _(dy, h):
    return h.new_empty(h.shape)


def _swiglu_grad(ctx, dy):
    (h,) = ctx.saved_tensors
    return _swiglu_backward_op(dy, h)


_swiglu_op.register_autograd(_swiglu_grad, setup_context=_save_input)


# -- public functions (the registry's `triton` implementations) -----------------------------------


def squared_relu(h: Tensor) -> Tensor:
    """`relu(h)^2`, elementwise, in h's dtype."""
    check_inputs("squared_relu", h=h)
    return _squared_relu_op(h)


def swiglu(h: Tensor) -> Tensor:
    """`silu(gate) * up` for h = [gate, up] along the last dim (even width), in h's dtype."""
    check_inputs("swiglu", h=h)
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(
            f"swiglu (triton): h has shape {tuple(h.shape)}; the last dim must be "
            "even, [gate, up] packed"
        )
    return _swiglu_op(h)
