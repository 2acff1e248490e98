"""Triton depthwise causal conv1d, forward and backward, channels-last (Mamba2's conv over
[x, B, C]). The eager reference, and the one statement of the math, is
kernels/conv1d/eager.py::causal_conv1d:

    y[b, t, c] = act(bias[c] + sum_{k<K} weight[c, k] * x[b, t - (K-1) + k, c]),  x = 0 before t = 0

with act None or SiLU and K in 1..4 (Mamba uses 4).

Both kernels stream time: a program owns a block of channels of one sequence for a stretch of
time and walks it four steps per iteration, so each row of x (and dy) is loaded once into
registers and the conv's window slides over registers, not over re-read memory. Kernels
narrower than 4 run with zero leading taps.

Forward: the three rows of x before each step stay in registers; y is rounded once into x's dtype.

Backward: with dpre = dy * act'(pre) (pre recomputed from x; nothing is saved but the inputs),
    dx[t]      = sum_j weight[:, K-1-j] * dpre[t + j]      (dpre = 0 past the end)
    dweight[k] = sum_{b,t} dpre[t] * x[t - (K-1) + k]
    dbias      = sum_{b,t} dpre[t]
The stretch runs backwards in time, carrying the three later steps' dpre and x; a halo of four
steps past the stretch supplies dpre for its last dx rows. Weight and bias gradients accumulate
in float32 registers, one partial per program, summed over programs in torch. No atomics, so
results are deterministic.

Each function is a `torch.library` custom op with a fake kernel and a registered autograd formula
whose backward is itself a custom op, as in kernels/norms/triton.py. On CPU tensors they run only
under TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.conv1d.eager import check_conv1d_args
from megatron_hybrid.kernels.triton_launch import check_inputs

MAX_WIDTH = 4  # the kernels unroll up to 4 taps


@triton.jit
def _row(X, base, t, cols, c_ok, L, stride_xt, stride_xc):
    """Row t of a (batch, time, channel) tensor at `cols`, in its own dtype; zero outside [0, L)
    (the causal padding before the start, nothing past the end)."""
    return tl.load(
        X + base + t.to(tl.int64) * stride_xt + cols * stride_xc,
        mask=_both(c_ok, (t >= 0) & (t < L)),
        other=0.0,
    )


@triton.jit
def _rows4(X, base, t, cols, c_ok, L, stride_xt, stride_xc):
    """Rows t .. t+3 (see `_row`). Loaded one iteration ahead of their use and converted to
    float32 only there, so they are in flight while the previous four steps compute."""
    return (
        _row(X, base, t, cols, c_ok, L, stride_xt, stride_xc),
        _row(X, base, t + 1, cols, c_ok, L, stride_xt, stride_xc),
        _row(X, base, t + 2, cols, c_ok, L, stride_xt, stride_xc),
        _row(X, base, t + 3, cols, c_ok, L, stride_xt, stride_xc),
    )


@triton.jit
def _both(vector_mask, scalar_ok):
    """vector_mask where the scalar condition holds, else all false (a where, not `&`: Triton's
    CPU interpreter rejects `&` of a vector and a scalar mask)."""
    return tl.where(scalar_ok, vector_mask, False)


@triton.jit
def _pre(b, w0, w1, w2, w3, xm3, xm2, xm1, x0):
    """The pre-activation at time t from x at t-3 .. t (taps right-aligned: w_j multiplies
    x[t - 3 + j]; a kernel narrower than 4 has zero leading taps)."""
    return b + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0


@triton.jit
def _act(pre, SILU: tl.constexpr):
    if SILU:
        pre = pre * tl.sigmoid(pre)
    return pre


@triton.jit
def _dpre(pre, dy, SILU: tl.constexpr):
    """d loss / d pre-activation from dy."""
    if SILU:
        sig = tl.sigmoid(pre)
        dy = dy * sig * (1.0 + pre * (1.0 - sig))
    return dy


@triton.jit
def _load_weights(
    W,
    BIAS,
    cols,
    c_ok,
    stride_wc,
    stride_wk,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The four right-aligned taps (w_j = weight[:, j - (4 - K)], zero for j < 4 - K) and the
    bias (zero without one), in float32."""
    w_ptr = W + cols * stride_wc - (4 - K) * stride_wk
    w0 = tl.load(w_ptr, mask=c_ok & (K > 3), other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + stride_wk, mask=c_ok & (K > 2), other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + 2 * stride_wk, mask=c_ok & (K > 1), other=0.0).to(tl.float32)
    w3 = tl.load(w_ptr + 3 * stride_wk, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=c_ok, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    return w0, w1, w2, w3, b


@triton.jit
def _conv_fwd_kernel(
    X,
    W,
    BIAS,
    Y,
    L,
    C,
    t_per_program,
    stride_xb,
    stride_xt,
    stride_xc,
    stride_wc,
    stride_wk,
    stride_yb,
    stride_yt,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (time stretch, channel block, batch) streams its stretch forwards four steps at a
    time, keeping the three previous rows of x in registers: each row of x is read once (the
    three before the stretch twice) and each row of y written once."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch = tl.program_id(2).to(tl.int64)
    c_ok = cols < C
    w0, w1, w2, w3, b = _load_weights(
        W, BIAS, cols, c_ok, stride_wc, stride_wk, K, HAS_BIAS, BLOCK_C
    )
    base = batch * stride_xb
    y_ptr = Y + batch * stride_yb + cols
    t_begin = tl.program_id(0) * t_per_program
    t_end = tl.minimum(t_begin + t_per_program, L)
    xm3 = _row(X, base, t_begin - 3, cols, c_ok, L, stride_xt, stride_xc).to(tl.float32)
    xm2 = _row(X, base, t_begin - 2, cols, c_ok, L, stride_xt, stride_xc).to(tl.float32)
    xm1 = _row(X, base, t_begin - 1, cols, c_ok, L, stride_xt, stride_xc).to(tl.float32)
    n0, n1, n2, n3 = _rows4(X, base, t_begin, cols, c_ok, L, stride_xt, stride_xc)
    for i in range(0, tl.cdiv(t_end - t_begin, 4)):
        t = t_begin + 4 * i
        a0, a1, a2, a3 = n0.to(tl.float32), n1.to(tl.float32), n2.to(tl.float32), n3.to(tl.float32)
        n0, n1, n2, n3 = _rows4(X, base, t + 4, cols, c_ok, L, stride_xt, stride_xc)
        y0 = _act(_pre(b, w0, w1, w2, w3, xm3, xm2, xm1, a0), SILU)
        y1 = _act(_pre(b, w0, w1, w2, w3, xm2, xm1, a0, a1), SILU)
        y2 = _act(_pre(b, w0, w1, w2, w3, xm1, a0, a1, a2), SILU)
        y3 = _act(_pre(b, w0, w1, w2, w3, a0, a1, a2, a3), SILU)
        row = y_ptr + t.to(tl.int64) * stride_yt
        tl.store(row, y0.to(Y.dtype.element_ty), mask=_both(c_ok, t < t_end))
        tl.store(row + stride_yt, y1.to(Y.dtype.element_ty), mask=_both(c_ok, t + 1 < t_end))
        tl.store(row + 2 * stride_yt, y2.to(Y.dtype.element_ty), mask=_both(c_ok, t + 2 < t_end))
        tl.store(row + 3 * stride_yt, y3.to(Y.dtype.element_ty), mask=_both(c_ok, t + 3 < t_end))
        xm3, xm2, xm1 = a1, a2, a3


@triton.jit
def _conv_bwd_kernel(
    X,
    W,
    BIAS,
    DY,
    DX,
    PARTIAL,
    L,
    C,
    t_per_program,
    stride_xb,
    stride_xt,
    stride_xc,
    stride_wc,
    stride_wk,
    stride_dyb,
    stride_dyt,
    stride_dyc,
    stride_dxb,
    stride_dxt,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (time stretch, channel block, batch) streams its stretch backwards four steps at
    a time. With dp = dpre at each step (recomputed from x: the inputs are all that is saved),
    dx[t] = sum_j w_{3-j} dp[t + j] needs the three later steps' dp, and pre[t] the three
    earlier rows of x: both stay in registers from step to step, so each row of x and dy is read
    once, plus a halo of four steps past the stretch (dp there, for its last dx rows) and three
    rows of x. Weight and bias gradients of the stretch's own steps sum in float32 registers into
    one partial per program."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch = tl.program_id(2).to(tl.int64)
    c_ok = cols < C
    w0, w1, w2, w3, b = _load_weights(
        W, BIAS, cols, c_ok, stride_wc, stride_wk, K, HAS_BIAS, BLOCK_C
    )
    base_x = batch * stride_xb
    dx_ptr = DX + batch * stride_dxb + cols
    t_begin = tl.program_id(0) * t_per_program
    t_end = tl.minimum(t_begin + t_per_program, L)
    zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw0, dw1, dw2, dw3, db = zero, zero, zero, zero, zero
    # dp of the three steps after the current four (none after the halo), x of the three steps
    # after the current four's first (x[t+1], x[t+2], x[t+3] for the block starting at t).
    dq1, dq2, dq3 = zero, zero, zero
    x1 = _row(X, base_x, t_end + 1, cols, c_ok, L, stride_xt, stride_xc).to(tl.float32)
    x2 = _row(X, base_x, t_end + 2, cols, c_ok, L, stride_xt, stride_xc).to(tl.float32)
    x3 = _row(X, base_x, t_end + 3, cols, c_ok, L, stride_xt, stride_xc).to(tl.float32)
    base_dy = batch * stride_dyb
    # Blocks of four steps from the halo block at t_end down to the one holding t_begin; each
    # block's x[t-3 .. t] and dy[t .. t+3] are loaded during the block before.
    nx0, nx1, nx2, nx3 = _rows4(X, base_x, t_end - 3, cols, c_ok, L, stride_xt, stride_xc)
    nd0, nd1, nd2, nd3 = _rows4(DY, base_dy, t_end, cols, c_ok, L, stride_dyt, stride_dyc)
    n_blocks = tl.cdiv(t_end - t_begin, 4) + 1
    for i in range(0, n_blocks):
        t = t_end - 4 * i
        xm3, xm2, xm1 = nx0.to(tl.float32), nx1.to(tl.float32), nx2.to(tl.float32)
        x0 = nx3.to(tl.float32)
        dy0, dy1, dy2 = nd0.to(tl.float32), nd1.to(tl.float32), nd2.to(tl.float32)
        dy3 = nd3.to(tl.float32)
        nx0, nx1, nx2, nx3 = _rows4(X, base_x, t - 7, cols, c_ok, L, stride_xt, stride_xc)
        nd0, nd1, nd2, nd3 = _rows4(DY, base_dy, t - 4, cols, c_ok, L, stride_dyt, stride_dyc)
        dp0 = _dpre(_pre(b, w0, w1, w2, w3, xm3, xm2, xm1, x0), dy0, SILU)
        dp1 = _dpre(_pre(b, w0, w1, w2, w3, xm2, xm1, x0, x1), dy1, SILU)
        dp2 = _dpre(_pre(b, w0, w1, w2, w3, xm1, x0, x1, x2), dy2, SILU)
        dp3 = _dpre(_pre(b, w0, w1, w2, w3, x0, x1, x2, x3), dy3, SILU)
        # The stretch's own steps only (the halo block and steps before t_begin: none).
        own0 = (t >= t_begin) & (t < t_end)
        own1 = (t + 1 >= t_begin) & (t + 1 < t_end)
        own2 = (t + 2 >= t_begin) & (t + 2 < t_end)
        own3 = (t + 3 >= t_begin) & (t + 3 < t_end)
        o0 = tl.where(own0, dp0, 0.0)
        o1 = tl.where(own1, dp1, 0.0)
        o2 = tl.where(own2, dp2, 0.0)
        o3 = tl.where(own3, dp3, 0.0)
        db += o0 + o1 + o2 + o3
        dw0 += o0 * xm3 + o1 * xm2 + o2 * xm1 + o3 * x0
        dw1 += o0 * xm2 + o1 * xm1 + o2 * x0 + o3 * x1
        dw2 += o0 * xm1 + o1 * x0 + o2 * x1 + o3 * x2
        dw3 += o0 * x0 + o1 * x1 + o2 * x2 + o3 * x3
        # x[t] feeds pre[t + j] through tap 3 - j.
        dx0 = w3 * dp0 + w2 * dp1 + w1 * dp2 + w0 * dp3
        dx1 = w3 * dp1 + w2 * dp2 + w1 * dp3 + w0 * dq1
        dx2 = w3 * dp2 + w2 * dp3 + w1 * dq1 + w0 * dq2
        dx3 = w3 * dp3 + w2 * dq1 + w1 * dq2 + w0 * dq3
        out = dx_ptr + t.to(tl.int64) * stride_dxt
        tl.store(out, dx0.to(DX.dtype.element_ty), mask=_both(c_ok, own0))
        tl.store(out + stride_dxt, dx1.to(DX.dtype.element_ty), mask=_both(c_ok, own1))
        tl.store(out + 2 * stride_dxt, dx2.to(DX.dtype.element_ty), mask=_both(c_ok, own2))
        tl.store(out + 3 * stride_dxt, dx3.to(DX.dtype.element_ty), mask=_both(c_ok, own3))
        dq1, dq2, dq3 = dp0, dp1, dp2
        x1, x2, x3 = xm3, xm2, xm1
    # PARTIAL is (programs, K + 1, C): rows 0..K-1 the weight taps, row K the bias; right-aligned
    # tap j is weight tap j - (4 - K).
    row = (batch * tl.num_programs(0) + tl.program_id(0)) * (K + 1)
    if K > 3:
        tl.store(PARTIAL + (row + K - 4) * C + cols, dw0, mask=c_ok)
    if K > 2:
        tl.store(PARTIAL + (row + K - 3) * C + cols, dw1, mask=c_ok)
    if K > 1:
        tl.store(PARTIAL + (row + K - 2) * C + cols, dw2, mask=c_ok)
    tl.store(PARTIAL + (row + K - 1) * C + cols, dw3, mask=c_ok)
    tl.store(PARTIAL + (row + K) * C + cols, db, mask=c_ok)


# -- launchers ------------------------------------------------------------------------------------

# Launch configuration on CUDA (benchmarks/sweep_kernels.py tries others): channels per program,
# warps, and time steps per program (best a multiple of 4), forward and backward. A backward
# program writes one float32 partial of the weight and bias gradients, so its stretch of time
# also sets the size of the partials (programs x (K + 1) x C; capped by MAX_PARTIAL_BYTES).
# Chosen by that sweep at hybrid-1b's xBC shape: the channels per program barely matter, short
# stretches of time keep many programs busy, and prefetching the next rows hides their loads.
# The measurements are in benchmarks/NOTES.md ("Launch configurations").
GPU_TUNING: dict[str, int] = {
    "block_c": 256,
    "warps": 2,
    "time": 32,
    "bwd_block_c": 256,
    "bwd_warps": 2,
    "bwd_time": 64,
}


# The backward's float32 weight-gradient partials stay under this: long sequences get longer
# stretches per program rather than more partials.
MAX_PARTIAL_BYTES = 32 * 1024 * 1024


def _launch(
    device: torch.device,
    channels: int,
    seqlen: int,
    pass_: str,
    batch: int = 1,
    width: int = MAX_WIDTH,
) -> tuple[int, int, int, int]:
    """(BLOCK_C, num_warps, time steps per program, programs along time) of the forward
    (`pass_` "") or backward ("bwd_") kernel; the backward's partials, batch x programs x
    (width + 1) x channels float32, are kept under MAX_PARTIAL_BYTES. Under the CPU interpreter
    small blocks, so that the tests' tiny shapes span several programs in time and channels."""
    if device.type == "cuda":
        block_c = min(GPU_TUNING[f"{pass_}block_c"], triton.next_power_of_2(channels))
        warps, steps = GPU_TUNING[f"{pass_}warps"], GPU_TUNING[f"{pass_}time"]
    else:
        block_c, warps, steps = min(16, triton.next_power_of_2(channels)), 1, 8
    if pass_ == "bwd_":
        partial_per_program = batch * (width + 1) * channels * 4
        max_programs = max(1, MAX_PARTIAL_BYTES // partial_per_program)
        steps = max(steps, 4 * triton.cdiv(triton.cdiv(seqlen, max_programs), 4))
    return block_c, warps, steps, triton.cdiv(seqlen, steps)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    batch, seqlen, channels = x.shape
    y = torch.empty((batch, seqlen, channels), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_c, num_warps, steps, programs = _launch(x.device, channels, seqlen, "")
    _conv_fwd_kernel[(programs, triton.cdiv(channels, block_c), batch)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        seqlen,
        channels,
        steps,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        y.stride(1),
        K=weight.shape[1],
        HAS_BIAS=bias is not None,
        SILU=silu,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return y


def _backward(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    dx = torch.empty((batch, seqlen, channels), dtype=x.dtype, device=x.device)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    if dx.numel() == 0:
        return (
            dx,
            torch.zeros(weight.shape, dtype=weight.dtype, device=x.device),
            torch.zeros(channels, dtype=bias_dtype, device=x.device),
        )
    block_c, num_warps, steps, programs = _launch(x.device, channels, seqlen, "bwd_", batch, width)
    partial = torch.empty(
        batch * programs, width + 1, channels, dtype=torch.float32, device=x.device
    )
    _conv_bwd_kernel[(programs, triton.cdiv(channels, block_c), batch)](
        x,
        weight,
        bias if bias is not None else weight,
        dy,
        dx,
        partial,
        seqlen,
        channels,
        steps,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        weight.stride(0),
        weight.stride(1),
        dy.stride(0),
        dy.stride(1),
        dy.stride(2),
        dx.stride(0),
        dx.stride(1),
        K=width,
        HAS_BIAS=bias is not None,
        SILU=silu,
        BLOCK_C=block_c,
        num_warps=num_warps,
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
def _causal_conv1d_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, x, weight, bias, silu)


@_causal_conv1d_backward_op.register_fake
def _(dy, x, weight, bias, silu):
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        weight.new_empty((x.shape[-1],), dtype=bias_dtype),
    )


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
    errors of kernels/conv1d/eager.py::causal_conv1d, for kernel widths 1..4.

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
