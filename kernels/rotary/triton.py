"""Triton rotary position embedding (rotate-half form), forward and backward. The eager
reference, and the one statement of the math, is kernels/rotary/eager.py::rotary:

    y = x * cos + cat(-x2, x1) * sin        x1, x2 = the two halves of the last dim (size D)

that is, per position t and pair (i, i + D/2), with c, s the cos and sin tables at (t, .):

    y1 = x1 * c1 - x2 * s1          dx1 = dy1 * c1 + dy2 * s2
    y2 = x2 * c2 + x1 * s2          dx2 = dy2 * c2 - dy1 * s1

x is (..., T, D) (attention's (B, heads, T, D), any strides with unit stride along D: q and k
are transposed views of the packed qkv projection, read in place), cos and sin are (T, D). One
kernel does both directions: program (b*h, time block) loads both halves of BLOCK_T rows,
computes in float32 and rounds once into x's dtype. The output keeps x's memory layout.

The gradients of cos and sin (the tables are constants in the model; computed only if asked
for) are sums over the leading dims, done in torch in float32.

Custom ops with fake kernels and a registered autograd formula whose backward is itself a custom
op, so torch.compile traces through without graph breaks. On CPU tensors they run only under
TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.triton_launch import check_inputs


@triton.jit
def _rotary_kernel(
    X,
    COS,
    SIN,
    Y,
    n_heads,
    seqlen,
    half,
    stride_xb,
    stride_xh,
    stride_xt,
    stride_yb,
    stride_yh,
    stride_yt,
    stride_ct,
    stride_st,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    mask = (t < seqlen)[:, None] & (i < half)[None, :]
    t64 = t.to(tl.int64)

    x_ptr = X + b * stride_xb + h * stride_xh + t64[:, None] * stride_xt + i[None, :]
    a1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    a2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    c_ptr = COS + t64[:, None] * stride_ct + i[None, :]
    s_ptr = SIN + t64[:, None] * stride_st + i[None, :]
    c1 = tl.load(c_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation: a = dy, out = dx
        o1 = a1 * c1 + a2 * s2
        o2 = a2 * c2 - a1 * s1
    else:  # a = x, out = y
        o1 = a1 * c1 - a2 * s1
        o2 = a2 * c2 + a1 * s2
    y_ptr = Y + b * stride_yb + h * stride_yh + t64[:, None] * stride_yt + i[None, :]
    tl.store(y_ptr, o1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half, o2.to(Y.dtype.element_ty), mask=mask)


# -- launcher -------------------------------------------------------------------------------------


def _as_4d(t: Tensor) -> Tensor:
    """(..., T, D) as (batch, heads, T, D): a view for 2-4 dims, a reshape above."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.dim() > 4:
        t = t.reshape(-1, *t.shape[-3:])
    return t if t.stride(-1) == 1 else t.contiguous()


def _table(t: Tensor, seqlen: int, dim: int) -> Tensor:
    t = t.reshape(seqlen, dim)
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(a: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    seqlen, dim = a.shape[-2:]
    a4 = _as_4d(a)
    out4 = torch.empty_like(a4)  # keeps a's layout: q and k stay (B, T, heads, D) in memory
    cos2, sin2 = _table(cos, seqlen, dim), _table(sin, seqlen, dim)
    batch, heads = a4.shape[:2]
    half = dim // 2
    if a4.numel():
        block_half = triton.next_power_of_2(half)
        block_t = max(1, min(64, 4096 // block_half))
        num_warps = 4 if block_t * block_half <= 2048 else 8
        grid = (batch * heads, triton.cdiv(seqlen, block_t))
        _rotary_kernel[grid](
            a4,
            cos2,
            sin2,
            out4,
            heads,
            seqlen,
            half,
            a4.stride(0),
            a4.stride(1),
            a4.stride(2),
            out4.stride(0),
            out4.stride(1),
            out4.stride(2),
            cos2.stride(0),
            sin2.stride(0),
            BACKWARD=backward,
            BLOCK_T=block_t,
            BLOCK_HALF=block_half,
            num_warps=num_warps,
        )
    return out4.view(a.shape) if a.dim() <= 4 else out4.reshape(a.shape)


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("megatron_hybrid::rotary", mutates_args=())
def _rotary_op(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _rotate(x, cos, sin, backward=False)


@_rotary_op.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


@torch.library.custom_op("megatron_hybrid::rotary_backward", mutates_args=())
def _rotary_backward_op(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _rotate(dy, cos, sin, backward=True)


@_rotary_backward_op.register_fake
def _(dy, cos, sin):
    return torch.empty_like(dy)


def _setup(ctx, inputs, output):
    x, cos, sin = inputs
    ctx.table_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(cos, sin, x if ctx.table_grads else None)
    ctx.x_dtype = x.dtype


def _table_grads(dy: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """d/dcos = sum over leading dims of dy * x; d/dsin = the same of dy * cat(-x2, x1)."""
    dy, x = dy.float(), x.float()
    x1, x2 = x.chunk(2, dim=-1)
    dcos, dsin = dy * x, dy * torch.cat((-x2, x1), dim=-1)
    if dy.dim() > 2:  # sum(()) would sum everything
        leading = tuple(range(dy.dim() - 2))
        dcos, dsin = dcos.sum(leading), dsin.sum(leading)
    return dcos.reshape(cos.shape).to(cos.dtype), dsin.reshape(sin.shape).to(sin.dtype)


def _grad(ctx, dy):
    cos, sin, x = ctx.saved_tensors
    dx = _rotary_backward_op(dy, cos, sin).to(ctx.x_dtype)
    if not ctx.table_grads:
        return dx, None, None
    dcos, dsin = _table_grads(dy, x, cos, sin)
    return dx, dcos, dsin


_rotary_op.register_autograd(_grad, setup_context=_setup)


# -- public function (the registry's `triton` implementation) -------------------------------------


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2) of x's last dim by the angles whose cos and sin are the (T, D)
    tables, position t of x's dim -2 by row t; float32 math, x's dtype and layout out."""
    check_inputs("rotary", x=x, cos=cos, sin=sin)
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(
            f"rotary (triton): x has shape {tuple(x.shape)}; expected (..., T, D) with D even"
        )
    seqlen, dim = x.shape[-2:]
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape[-2:] != (seqlen, dim) or table.numel() != seqlen * dim:
            raise ValueError(
                f"rotary (triton): {name} has shape {tuple(table.shape)}, expected "
                f"({seqlen}, {dim}) for x of shape {tuple(x.shape)}"
            )
    return _rotary_op(x, cos, sin)
