"""Triton decoding step of Mamba2's SSM: the registry's `triton` implementation of op `ssd_step`,
with the arguments and semantics of the eager reference kernels/ssd_step/eager.py::ssd_step:

    state = exp(dt * A_h) * state + dt * outer(x, B_g)        y = state @ C_g + D_h * x

Program (batch * head, block of headdim rows): loads its (BLOCK_P, dstate) tile of the state
once, processes dt as the chunked scan's forward does (dt_bias, softplus, dt_limit; the same
`softplus` as kernels/ssd/triton_fwd.py), writes the tile back and reduces it against C for y.
Every product and sum is float32 (the state's dtype); y is rounded once into x's dtype. A decode
step reads the whole state once and writes it once, so it is bound by memory bandwidth; one
launch per layer and token replaces the eager path's dozen small ones.

A `torch.library` custom op that mutates the state, with a fake kernel, so torch.compile (and
CUDA graphs over a decoding step) trace it. On CPU tensors it runs only under TRITON_INTERPRET=1
(the registry checks this).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.ssd.eager import NO_DT_LIMIT
from megatron_hybrid.kernels.ssd.triton_fwd import softplus
from megatron_hybrid.kernels.ssd_step.eager import check_ssd_step_args
from megatron_hybrid.kernels.triton_launch import check_inputs

# Elements of the state tile per program: headdim rows x dstate columns (64 x 128 at Nemotron-H's
# sizes, 32 KiB of float32 in registers over 4 warps).
_TILE_ELEMENTS = 8192


@triton.jit
def _ssd_step_kernel(
    STATE,
    X,
    DT,
    A,
    B,
    C,
    D,
    DT_BIAS,
    Y,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    stride_s_b,
    stride_s_h,
    stride_s_p,
    stride_x_b,
    stride_x_h,
    stride_dt_b,
    stride_b_b,
    stride_b_g,
    stride_c_b,
    stride_c_g,
    stride_y_b,
    stride_y_h,
    dt_min,
    dt_max,
    HAS_D: tl.constexpr,
    D_PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // nheads).to(tl.int64)
    h = bh % nheads
    g = h // heads_per_group
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok = p < headdim
    n_ok = n < dstate
    tile_ok = p_ok[:, None] & n_ok[None, :]

    dt = tl.load(DT + b * stride_dt_b + h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(DT_BIAS + h).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    decay = tl.exp(dt * tl.load(A + h).to(tl.float32))

    x = tl.load(X + b * stride_x_b + h * stride_x_h + p, mask=p_ok, other=0.0).to(tl.float32)
    b_n = tl.load(B + b * stride_b_b + g * stride_b_g + n, mask=n_ok, other=0.0).to(tl.float32)
    c_n = tl.load(C + b * stride_c_b + g * stride_c_g + n, mask=n_ok, other=0.0).to(tl.float32)
    s_ptr = STATE + b * stride_s_b + h * stride_s_h + p[:, None] * stride_s_p + n[None, :]
    state = tl.load(s_ptr, mask=tile_ok, other=0.0)
    state = state * decay + (dt * x)[:, None] * b_n[None, :]
    tl.store(s_ptr, state, mask=tile_ok)

    y = tl.sum(state * c_n[None, :], axis=1)
    if HAS_D:
        if D_PER_ROW:
            d = tl.load(D + h * headdim + p, mask=p_ok, other=0.0).to(tl.float32)
        else:
            d = tl.load(D + h).to(tl.float32)
        y += d * x
    tl.store(Y + b * stride_y_b + h * stride_y_h + p, y.to(Y.dtype.element_ty), mask=p_ok)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("megatron_hybrid::ssd_step", mutates_args=("state",))
def _ssd_step_op(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> Tensor:
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    block_n = triton.next_power_of_2(dstate)
    block_p = max(1, min(triton.next_power_of_2(headdim), _TILE_ELEMENTS // block_n))
    x, B, C = _last_dim_contiguous(x), _last_dim_contiguous(B), _last_dim_contiguous(C)
    has_limit = (dt_min, dt_max) != NO_DT_LIMIT
    grid = (batch * nheads, triton.cdiv(headdim, block_p))
    _ssd_step_kernel[grid](
        state,
        x,
        dt,
        A,
        B,
        C,
        D.contiguous() if D is not None else x,  # dummy pointer when absent
        dt_bias if dt_bias is not None else dt,
        y,
        nheads,
        nheads // ngroups,
        headdim,
        dstate,
        state.stride(0),
        state.stride(1),
        state.stride(2),
        x.stride(0),
        x.stride(1),
        dt.stride(0),
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        y.stride(0),
        y.stride(1),
        float(dt_min),
        float(dt_max) if math.isfinite(dt_max) else 3.0e38,
        HAS_D=D is not None,
        D_PER_ROW=D is not None and D.dim() == 2,
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus,
        HAS_LIMIT=has_limit,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        num_warps=4 if x.device.type == "cuda" else 1,
    )
    return y


@_ssd_step_op.register_fake
def _(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x)


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
) -> Tensor:
    """Advance `state` (batch, nheads, headdim, dstate) by one token in place and return y
    (batch, nheads, headdim) in x's dtype; arguments as kernels/ssd_step/eager.py::ssd_step. The
    state must be float32 and contiguous in its last dim (the chunked scan returns it so)."""
    check_ssd_step_args(state, x, dt, A, B, C, D, dt_bias, dt_limit, name="ssd_step (triton)")
    check_inputs("ssd_step", x=x, dt=dt, A=A, B=B, C=C)
    if state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError(
            f"ssd_step (triton): state is {state.dtype} with strides {state.stride()}; the "
            "kernel updates a float32 state with unit stride along dstate in place"
        )
    if dt.stride(-1) != 1 and dt.shape[-1] > 1:
        dt = dt.contiguous()
    return _ssd_step_op(
        state,
        x,
        dt,
        A.contiguous(),
        B,
        C,
        D,
        dt_bias.contiguous() if dt_bias is not None else None,
        dt_softplus,
        float(dt_limit[0]),
        float(dt_limit[1]),
    )
