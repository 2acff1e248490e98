"""Triton depthwise causal conv1d, forward and backward, channels-last (Mamba2's conv over
[x, B, C]). The eager reference, and the one statement of the math, is
kernels/conv1d_eager.py::causal_conv1d:

    y[b, t, c] = act(bias[c] + sum_{k<K} weight[c, k] * x[b, t - (K-1) + k, c]),  x = 0 before t = 0

with act None or SiLU and K in 1..4 (Mamba uses 4).

Forward: program (time block, channel block, batch) loads the K shifted (BLOCK_T, BLOCK_C) tiles
of x it needs, sums them in float32 and rounds once into x's dtype.

Backward: with dpre = dy * act'(pre) (pre recomputed from x; nothing is saved but the inputs),
    dx[t]      = sum_j weight[:, K-1-j] * dpre[t + j]      (dpre = 0 past the end)
    dweight[k] = sum_{b,t} dpre[t] * x[t - (K-1) + k]
    dbias      = sum_{b,t} dpre[t]
Program (time chunk, channel block, batch) walks its chunk of time in BLOCK_T steps, recomputing
dpre at the K shifts each dx tile needs (cheap: the extra loads hit cache), and accumulates its
weight and bias gradients in float32 registers; one float32 partial per program is summed over
programs in torch. No atomics, so results are deterministic.

Each function is a `torch.library` custom op with a fake kernel and a registered autograd formula
whose backward is itself a custom op, as in kernels/triton_norms.py. On CPU tensors they run only
under TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.conv1d_eager import check_conv1d_args
from megatron_hybrid.kernels.triton_launch import check_inputs

MAX_WIDTH = 4  # the kernels unroll up to 4 taps


@triton.jit
def _tap(X, base, t, cols, c_ok, L, stride_xt, stride_xc):
    """x[b, t, cols] in float32, zero for t outside [0, L) (the causal zero padding)."""
    ok = (t >= 0) & (t < L)
    ptr = X + base + t.to(tl.int64)[:, None] * stride_xt + cols[None, :] * stride_xc
    return tl.load(ptr, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre(X, base, t, cols, c_ok, L, stride_xt, stride_xc, w0, w1, w2, w3, b,
         K: tl.constexpr):
    """The pre-activation at times t: b + sum_k w_k * x[t - (K-1) + k]."""
    acc = b[None, :] + w0[None, :] * _tap(X, base, t - (K - 1), cols, c_ok, L, stride_xt,
                                          stride_xc)
    if K > 1:
        acc += w1[None, :] * _tap(X, base, t - (K - 2), cols, c_ok, L, stride_xt, stride_xc)
    if K > 2:
        acc += w2[None, :] * _tap(X, base, t - (K - 3), cols, c_ok, L, stride_xt, stride_xc)
    if K > 3:
        acc += w3[None, :] * _tap(X, base, t - (K - 4), cols, c_ok, L, stride_xt, stride_xc)
    return acc


@triton.jit
def _pick(w0, w1, w2, w3, I: tl.constexpr):
    """w_I for a compile-time I."""
    w = w0
    if I == 1:
        w = w1
    if I == 2:
        w = w2
    if I == 3:
        w = w3
    return w


@triton.jit
def _dpre(X, DY, base_x, base_dy, u, cols, c_ok, L, stride_xt, stride_xc, stride_dyt,
          stride_dyc, w0, w1, w2, w3, b, K: tl.constexpr, SILU: tl.constexpr):
    """d loss / d pre-activation at times u (zero for u >= L)."""
    ok = (u < L)[:, None] & c_ok[None, :]
    dy = tl.load(DY + base_dy + u.to(tl.int64)[:, None] * stride_dyt
                 + cols[None, :] * stride_dyc, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        pre = _pre(X, base_x, u, cols, c_ok, L, stride_xt, stride_xc, w0, w1, w2, w3, b, K)
        sig = tl.sigmoid(pre)
        dy = dy * sig * (1.0 + pre * (1.0 - sig))
    return dy


@triton.jit
def _load_weights(W, BIAS, cols, c_ok, stride_wc, stride_wk, K: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Taps 0..3 of the weight (zero past K) and the bias (zero without one), in float32."""
    w_ptr = W + cols * stride_wc
    w0 = tl.load(w_ptr, mask=c_ok, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + stride_wk, mask=c_ok & (K > 1), other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + 2 * stride_wk, mask=c_ok & (K > 2), other=0.0).to(tl.float32)
    w3 = tl.load(w_ptr + 3 * stride_wk, mask=c_ok & (K > 3), other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=c_ok, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    return w0, w1, w2, w3, b


@triton.jit
def _conv_fwd_kernel(
    X, W, BIAS, Y,
    L, C,
    stride_xb, stride_xt, stride_xc, stride_wc, stride_wk, stride_yb, stride_yt,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch = tl.program_id(2).to(tl.int64)
    c_ok = cols < C
    w0, w1, w2, w3, b = _load_weights(W, BIAS, cols, c_ok, stride_wc, stride_wk, K, HAS_BIAS,
                                      BLOCK_C)
    y = _pre(X, batch * stride_xb, t, cols, c_ok, L, stride_xt, stride_xc, w0, w1, w2, w3, b, K)
    if SILU:
        y = y * tl.sigmoid(y)
    ptr = Y + batch * stride_yb + t.to(tl.int64)[:, None] * stride_yt + cols[None, :]
    tl.store(ptr, y.to(Y.dtype.element_ty), mask=(t < L)[:, None] & c_ok[None, :])


@triton.jit
def _conv_bwd_kernel(
    X, W, BIAS, DY, DX, PARTIAL,
    L, C, t_per_program,
    stride_xb, stride_xt, stride_xc, stride_wc, stride_wk,
    stride_dyb, stride_dyt, stride_dyc, stride_dxb, stride_dxt,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch = tl.program_id(2).to(tl.int64)
    c_ok = cols < C
    w0, w1, w2, w3, b = _load_weights(W, BIAS, cols, c_ok, stride_wc, stride_wk, K, HAS_BIAS,
                                      BLOCK_C)
    base_x = batch * stride_xb
    base_dy = batch * stride_dyb
    dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t_begin = pid_t * t_per_program
    t_end = tl.minimum(t_begin + t_per_program, L)
    for start in range(t_begin, t_end, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        mine = (t < t_end)[:, None] & c_ok[None, :]
        dp = _dpre(X, DY, base_x, base_dy, t, cols, c_ok, L, stride_xt, stride_xc, stride_dyt,
                   stride_dyc, w0, w1, w2, w3, b, K, SILU)
        dp = tl.where(mine, dp, 0.0)
        # Weight and bias gradients from this tile's own times.
        db += tl.sum(dp, axis=0)
        dw0 += tl.sum(dp * _tap(X, base_x, t - (K - 1), cols, c_ok, L, stride_xt, stride_xc),
                      axis=0)
        if K > 1:
            dw1 += tl.sum(dp * _tap(X, base_x, t - (K - 2), cols, c_ok, L, stride_xt,
                                    stride_xc), axis=0)
        if K > 2:
            dw2 += tl.sum(dp * _tap(X, base_x, t - (K - 3), cols, c_ok, L, stride_xt,
                                    stride_xc), axis=0)
        if K > 3:
            dw3 += tl.sum(dp * _tap(X, base_x, t - (K - 4), cols, c_ok, L, stride_xt,
                                    stride_xc), axis=0)
        # x[t] feeds pre[t + j] through tap K-1-j.
        dx = _pick(w0, w1, w2, w3, K - 1)[None, :] * dp
        for j in tl.static_range(1, K):
            dpj = _dpre(X, DY, base_x, base_dy, t + j, cols, c_ok, L, stride_xt, stride_xc,
                        stride_dyt, stride_dyc, w0, w1, w2, w3, b, K, SILU)
            dx += _pick(w0, w1, w2, w3, K - 1 - j)[None, :] * dpj
        ptr = DX + batch * stride_dxb + t.to(tl.int64)[:, None] * stride_dxt + cols[None, :]
        tl.store(ptr, dx.to(DX.dtype.element_ty), mask=mine)
    # PARTIAL is (programs, K + 1, C): rows 0..K-1 the weight taps, row K the bias.
    row = (batch * tl.num_programs(0) + pid_t) * (K + 1)
    tl.store(PARTIAL + row * C + cols, dw0, mask=c_ok)
    if K > 1:
        tl.store(PARTIAL + (row + 1) * C + cols, dw1, mask=c_ok)
    if K > 2:
        tl.store(PARTIAL + (row + 2) * C + cols, dw2, mask=c_ok)
    if K > 3:
        tl.store(PARTIAL + (row + 3) * C + cols, dw3, mask=c_ok)
    tl.store(PARTIAL + (row + K) * C + cols, db, mask=c_ok)


# -- launchers ------------------------------------------------------------------------------------

def _blocks(device: torch.device, channels: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps). Under the CPU interpreter small tiles, so that the tests'
    tiny shapes span several tiles in time and channels."""
    if device.type != "cuda":
        return 8, min(16, triton.next_power_of_2(channels)), 1
    block_c = min(128, triton.next_power_of_2(channels))
    return 32, block_c, 4


def _time_programs(device: torch.device, time_blocks: int, others: int) -> int:
    """Backward programs along time per (channel block, batch): enough to fill the GPU, few
    enough that the float32 partials stay small."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(time_blocks, triton.cdiv(target, others)))
    return max(1, min(time_blocks, 2))


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    batch, seqlen, channels = x.shape
    y = torch.empty((batch, seqlen, channels), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_t, block_c, num_warps = _blocks(x.device, channels)
    grid = (triton.cdiv(seqlen, block_t), triton.cdiv(channels, block_c), batch)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        seqlen, channels,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        y.stride(0), y.stride(1),
        K=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y


def _backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
              silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    dx = torch.empty((batch, seqlen, channels), dtype=x.dtype, device=x.device)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    if dx.numel() == 0:
        return (dx, torch.zeros(weight.shape, dtype=weight.dtype, device=x.device),
                torch.zeros(channels, dtype=bias_dtype, device=x.device))
    block_t, block_c, num_warps = _blocks(x.device, channels)
    channel_blocks = triton.cdiv(channels, block_c)
    programs = _time_programs(x.device, triton.cdiv(seqlen, block_t), channel_blocks * batch)
    t_per_program = triton.cdiv(triton.cdiv(seqlen, programs), block_t) * block_t
    programs = triton.cdiv(seqlen, t_per_program)
    partial = torch.empty(batch * programs, width + 1, channels, dtype=torch.float32,
                          device=x.device)
    _conv_bwd_kernel[(programs, channel_blocks, batch)](
        x, weight, bias if bias is not None else weight, dy, dx, partial,
        seqlen, channels, t_per_program,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        dy.stride(0), dy.stride(1), dy.stride(2), dx.stride(0), dx.stride(1),
        K=width, HAS_BIAS=bias is not None, SILU=silu,
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    total = partial.sum(0)  # (K + 1, C) in float32, rounded once below
    # Copies, so that the two gradients do not share `total` (custom ops return no aliases).
    dw = total[:width].t().to(weight.dtype, memory_format=torch.contiguous_format, copy=True)
    return dx, dw, total[width].to(bias_dtype, copy=True)


# -- custom ops -----------------------------------------------------------------------------------

@torch.library.custom_op("megatron_hybrid::causal_conv1d", mutates_args=())
def _causal_conv1d_op(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    return _forward(x, weight, bias, silu)


@_causal_conv1d_op.register_fake
def _(x, weight, bias, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("megatron_hybrid::causal_conv1d_backward", mutates_args=())
def _causal_conv1d_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                               silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, x, weight, bias, silu)


@_causal_conv1d_backward_op.register_fake
def _(dy, x, weight, bias, silu):
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((x.shape[-1],), dtype=bias_dtype))


def _setup(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu
    ctx.has_bias = bias is not None


def _grad(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _causal_conv1d_backward_op(dy, x, weight, bias, ctx.silu)
    return dx, dw, db if ctx.has_bias else None, None


_causal_conv1d_op.register_autograd(_grad, setup_context=_setup)


# -- public function (the registry's `triton` implementation) -------------------------------------

def causal_conv1d(
    x_BLC: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Depthwise causal convolution over time, then an optional SiLU; the semantics, shapes and
    errors of kernels/conv1d_eager.py::causal_conv1d, for kernel widths 1..4.

    Args:
        x_BLC: (batch, seqlen, channels), any strides (e.g. a slice of a packed projection).
        weight: (channels, kernel_width) or (channels, 1, kernel_width).
        bias: optional (channels,).
        activation: None, or "silu" / "swish".

    Returns:
        y (batch, seqlen, channels), contiguous, in x's dtype; differentiable in x, weight, bias.
    """
    weight = check_conv1d_args(x_BLC, weight, bias, activation, "causal_conv1d (triton)")
    if weight.shape[1] > MAX_WIDTH:
        raise ValueError(
            f"causal_conv1d (triton): kernel width {weight.shape[1]} is not supported (1 to "
            f"{MAX_WIDTH}); use the eager kernel for wider convolutions"
        )
    tensors = dict(x=x_BLC, weight=weight, **({"bias": bias} if bias is not None else {}))
    check_inputs("causal_conv1d", **tensors)
    return _causal_conv1d_op(x_BLC, weight, bias, activation is not None)
