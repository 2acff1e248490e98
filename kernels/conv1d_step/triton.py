"""Triton decoding step of the depthwise causal conv1d: the registry's `triton` implementation of
op `causal_conv1d_step`, with the arguments and semantics of the eager reference
kernels/conv1d_step/eager.py::causal_conv1d_step:

    y[b, c] = act(bias[c] + sum_{k<K-1} weight[c, k] * state[b, c, k] + weight[c, K-1] * x[b, c])
    state[b, c] <- (state[b, c, 1:], x[b, c])

Program (batch, block of channels): the K-1 state columns and x are loaded once, the window is
summed in float32, the shifted window is written back and y rounded once into x's dtype. One
launch replaces the eager path's concatenation, product, sum, bias, copy and SiLU.

A `torch.library` custom op that mutates the state, with a fake kernel. On CPU tensors it runs
only under TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.conv1d_step.eager import check_conv1d_step_args
from megatron_hybrid.kernels.triton_launch import check_inputs

_BLOCK_C = 256


@triton.jit
def _conv1d_step_kernel(
    X,
    STATE,
    W,
    BIAS,
    Y,
    channels,
    stride_x_b,
    stride_s_b,
    stride_s_c,
    stride_s_k,
    stride_w_c,
    stride_w_k,
    stride_y_b,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < channels
    x = tl.load(X + b * stride_x_b + c, mask=ok, other=0.0)
    acc = x.to(tl.float32) * tl.load(W + c * stride_w_c + (WIDTH - 1) * stride_w_k, mask=ok).to(
        tl.float32
    )
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=ok, other=0.0).to(tl.float32)
    s_ptr = STATE + b * stride_s_b + c * stride_s_c
    for k in tl.static_range(WIDTH - 1):
        v = tl.load(s_ptr + k * stride_s_k, mask=ok, other=0.0)
        acc += v.to(tl.float32) * tl.load(W + c * stride_w_c + k * stride_w_k, mask=ok).to(
            tl.float32
        )
        if k > 0:  # shift left: column k moves to k - 1
            tl.store(s_ptr + (k - 1) * stride_s_k, v, mask=ok)
    if WIDTH > 1:
        tl.store(s_ptr + (WIDTH - 2) * stride_s_k, x.to(STATE.dtype.element_ty), mask=ok)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(Y + b * stride_y_b + c, acc.to(Y.dtype.element_ty), mask=ok)


@torch.library.custom_op("megatron_hybrid::causal_conv1d_step", mutates_args=("state",))
def _conv1d_step_op(
    x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, silu: bool
) -> Tensor:
    batch, channels = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    grid = (batch, triton.cdiv(channels, _BLOCK_C))
    _conv1d_step_kernel[grid](
        x,
        state,
        weight,
        bias if bias is not None else x,  # dummy pointer when absent
        y,
        channels,
        x.stride(0),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        WIDTH=weight.shape[1],
        HAS_BIAS=bias is not None,
        SILU=silu,
        BLOCK_C=_BLOCK_C,
        num_warps=4 if x.device.type == "cuda" else 1,
    )
    return y


@_conv1d_step_op.register_fake
def _(x, state, weight, bias, silu):
    return torch.empty_like(x)


def causal_conv1d_step(
    x_BC: Tensor,
    state_BCW: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """The conv's output for one new input (batch, channels), shifting it into `state_BCW`
    (batch, channels, kernel_width - 1) in place; as kernels/conv1d_step/eager.py."""
    weight = check_conv1d_step_args(
        x_BC, state_BCW, weight, bias, activation, name="causal_conv1d_step (triton)"
    )
    check_inputs("causal_conv1d_step", x=x_BC, state=state_BCW, weight=weight)
    if bias is not None:
        bias = bias.contiguous()
    return _conv1d_step_op(x_BC, state_BCW, weight, bias, activation is not None)
