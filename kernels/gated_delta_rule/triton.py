"""The chunked gated delta rule with its chunk loop in Triton: the registry's `triton`
implementation of op `gated_delta_rule`, with the arguments, results and errors of the eager
reference (kernels/gated_delta_rule/eager.py, whose docstring has the math).

Everything parallel over chunks stays batched torch, shared with the eager op
(`prepare_chunks`: U, W by one triangular solve, the masked scores, q_decayed, k_to_end,
chunk_decay). Only the sequential part, the state carried from chunk to chunk, is a pair of
Triton kernels. Per batch row and value head, with the state S (key_dim x value_dim) entering
chunk n and a_n = chunk_decay, Kt_n = k_to_end:

    d_n = U_n - W_n S_n,        S_{n+1} = a_n S_n + Kt_n d_n

The forward kernel stores every d_n (D), every S_n for n < N (H) and the final state S_N; the
outputs are then one batched torch expression, O = q_decayed H + scores D. Given dD, dH and dS_N
the backward kernel runs the chunks in reverse:

    dd_n = dD_n + Kt_n^T dS_{n+1},      dS_n = a_n dS_{n+1} + dH_n - W_n^T dd_n

and stores every dd_n and dS_{n+1}; the sums over value_dim are batched torch matmuls afterwards:
dU = dd, dW_n = -dd_n S_n^T, dKt_n = dS_{n+1} d_n^T, da_n = <dS_{n+1}, S_n>.

Both kernels run one program per (tile of value columns, batch row * value head): the columns
of S are independent (every step multiplies S from the left), so a program holds a key_dim x
BLOCK_V slice of the state in registers, whole along key_dim (padded to a power of two), and
loops over the chunks.

Precision: the state, d and every sum are in the eager op's compute dtype (float32, or float64
when any input is). Matmul operands follow the SSD kernels (kernels/ssd/triton.py): the inputs'
half dtype when q, k and v share one (bf16 tensor cores; W, Kt, the state and d rounded to it
for the products, as fla does), else the compute dtype with IEEE products.

Memory beyond the eager op's operands: D and H (as many values as the eager op's saved per-chunk
states and d's), and in the backward dd and dS of the same sizes.

The forward and the backward are `torch.library` custom ops with fake kernels and a registered
autograd formula, so torch.compile traces them without graph breaks. On CPU tensors the kernels
run only under TRITON_INTERPRET=1 (the registry checks this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.gated_delta_rule.eager import (
    DEFAULT_CHUNK_SIZE,
    ChunkedRule,
    check_gated_delta_rule_args,
    prepare_chunks,
)
from megatron_hybrid.kernels.ssd.triton_fwd import mm
from megatron_hybrid.kernels.triton_launch import SUPPORTED_DTYPES, check_inputs

# Launch configuration on CUDA: value columns per program and warps. Qwen3-Next's shape (2 x 32
# value heads of 128) with 32 columns gives 256 programs, two per H100 SM. Not yet swept.
GPU_TUNING: dict[str, int] = {"block_v": 32, "warps": 4}
# Under the CPU interpreter: small tiles, so that the tests' value dims span several.
_INTERPRETER_BLOCK_V = 16
_DTYPES = (*SUPPORTED_DTYPES, torch.float64)
_TL_DTYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _mm(a, b, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b: float64 products for float64, else the SSD kernels' `mm` (operands rounded to
    DOT_DTYPE, float32 accumulation, IEEE products for float32)."""
    if DOT_DTYPE == tl.float64:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return mm(a, b, DOT_DTYPE, INTERPRET)


@triton.jit
def _recurrence_fwd_kernel(
    U,
    W,
    K_END,
    DECAY,
    S0,
    D,
    H,
    FINAL,
    nchunks,
    chunk_size,
    key_dim,
    value_dim,
    stride_u_bh,
    stride_u_n,
    stride_u_c,
    stride_w_bh,
    stride_w_n,
    stride_w_c,
    stride_k_bh,
    stride_k_n,
    stride_k_c,
    CP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (value tile, batch * value head): the chunks in order from S0, storing d_n in D,
    S_n in H and S_N in FINAL. U (C, V) and W, K_END (C, K) rows per chunk (K_END holds Kt_n
    transposed); D (C, V), H (K, V), S0 and FINAL (K, V) contiguous."""
    bh = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, CP)
    kk = tl.arange(0, BK)
    cols = tl.program_id(0) * BV + tl.arange(0, BV)
    i_ok, k_ok, v_ok = i < chunk_size, kk < key_dim, cols < value_dim
    state_offsets = kk[:, None] * value_dim + cols[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    rows_mask = i_ok[:, None] & v_ok[None, :]
    state = tl.load(S0 + bh * key_dim * value_dim + state_offsets, mask=state_mask, other=0.0)
    for n in range(nchunks):
        chunk = bh * nchunks + n
        w = tl.load(
            W + bh * stride_w_bh + n * stride_w_n + i[:, None] * stride_w_c + kk[None, :],
            mask=i_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        k_end_t = tl.load(  # Kt_n, (BK, CP)
            K_END + bh * stride_k_bh + n * stride_k_n + i[None, :] * stride_k_c + kk[:, None],
            mask=k_ok[:, None] & i_ok[None, :],
            other=0.0,
        )
        u = tl.load(
            U + bh * stride_u_bh + n * stride_u_n + i[:, None] * stride_u_c + cols[None, :],
            mask=rows_mask,
            other=0.0,
        )
        decay = tl.load(DECAY + chunk)
        tl.store(H + chunk * key_dim * value_dim + state_offsets, state, mask=state_mask)
        d = u - _mm(w, state, DOT_DTYPE, INTERPRET)
        tl.store(
            D + chunk * chunk_size * value_dim + i[:, None] * value_dim + cols[None, :],
            d,
            mask=rows_mask,
        )
        state = decay * state + _mm(k_end_t, d, DOT_DTYPE, INTERPRET)
    tl.store(FINAL + bh * key_dim * value_dim + state_offsets, state, mask=state_mask)


@triton.jit
def _recurrence_bwd_kernel(
    DD_IN,
    DH,
    DFINAL,
    W,
    K_END,
    DECAY,
    DD,
    DS_NEXT,
    DS0,
    nchunks,
    chunk_size,
    key_dim,
    value_dim,
    stride_din_bh,
    stride_din_n,
    stride_din_c,
    stride_dh_bh,
    stride_dh_n,
    stride_dh_k,
    stride_w_bh,
    stride_w_n,
    stride_w_c,
    stride_k_bh,
    stride_k_n,
    stride_k_c,
    CP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (value tile, batch * value head): the chunks in reverse from dS_N (DFINAL), given
    dD (DD_IN, rows (C, V)) and dH (DH, rows (K, V)); stores dd_n in DD (C, V), dS_{n+1} in
    DS_NEXT (K, V) and dS_0 in DS0, all contiguous."""
    bh = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, CP)
    kk = tl.arange(0, BK)
    cols = tl.program_id(0) * BV + tl.arange(0, BV)
    i_ok, k_ok, v_ok = i < chunk_size, kk < key_dim, cols < value_dim
    state_offsets = kk[:, None] * value_dim + cols[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    rows_mask = i_ok[:, None] & v_ok[None, :]
    grad = tl.load(DFINAL + bh * key_dim * value_dim + state_offsets, mask=state_mask, other=0.0)
    for m in range(nchunks):
        n = nchunks - 1 - m
        chunk = bh * nchunks + n
        w_t = tl.load(  # W_n^T, (BK, CP)
            W + bh * stride_w_bh + n * stride_w_n + i[None, :] * stride_w_c + kk[:, None],
            mask=k_ok[:, None] & i_ok[None, :],
            other=0.0,
        )
        k_end = tl.load(  # Kt_n^T, (CP, BK)
            K_END + bh * stride_k_bh + n * stride_k_n + i[:, None] * stride_k_c + kk[None, :],
            mask=i_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        d_in = tl.load(
            DD_IN
            + bh * stride_din_bh
            + n * stride_din_n
            + i[:, None] * stride_din_c
            + cols[None, :],
            mask=rows_mask,
            other=0.0,
        )
        dh = tl.load(
            DH + bh * stride_dh_bh + n * stride_dh_n + kk[:, None] * stride_dh_k + cols[None, :],
            mask=state_mask,
            other=0.0,
        )
        decay = tl.load(DECAY + chunk)
        tl.store(DS_NEXT + chunk * key_dim * value_dim + state_offsets, grad, mask=state_mask)
        dd = d_in + _mm(k_end, grad, DOT_DTYPE, INTERPRET)
        tl.store(
            DD + chunk * chunk_size * value_dim + i[:, None] * value_dim + cols[None, :],
            dd,
            mask=rows_mask,
        )
        grad = decay * grad + dh - _mm(w_t, dd, DOT_DTYPE, INTERPRET)
    tl.store(DS0 + bh * key_dim * value_dim + state_offsets, grad, mask=state_mask)


# -- launchers ------------------------------------------------------------------------------------


def _rows(t: Tensor) -> Tensor:
    """`t` with unit stride along its last dim (the kernels take the other strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(U: Tensor, key_dim: int, dot_dtype: torch.dtype) -> tuple[tuple[int, int], dict]:
    """The grid and the block sizes and launch options shared by both kernels."""
    programs, _, chunk_size, value_dim = U.shape
    cuda = U.device.type == "cuda"
    block_v = GPU_TUNING["block_v"] if cuda else _INTERPRETER_BLOCK_V
    block_v = min(block_v, max(16, triton.next_power_of_2(value_dim)))
    # Powers of two, at least 16: tl.arange and tl.dot need them.
    options = dict(
        CP=max(16, triton.next_power_of_2(chunk_size)),
        BK=max(16, triton.next_power_of_2(key_dim)),
        BV=block_v,
        DOT_DTYPE=_TL_DTYPES[dot_dtype],
        INTERPRET=not cuda,
        num_warps=GPU_TUNING["warps"] if cuda else 1,
    )
    return (triton.cdiv(value_dim, block_v), programs), options


def _dot_dtype(q: Tensor, k: Tensor, v: Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kernels' matmul operands (module docstring)."""
    half = q.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
    return q.dtype if half else compute_dtype


def _forward(
    U: Tensor,
    W: Tensor,
    k_end: Tensor,
    decay: Tensor,
    initial_state: Tensor,
    dot_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(D, H, final state); shapes as `_recurrence_op`."""
    programs, nchunks, chunk_size, value_dim = U.shape
    key_dim = W.shape[-1]
    D = torch.empty(U.shape, dtype=U.dtype, device=U.device)
    H = U.new_empty((programs, nchunks, key_dim, value_dim))
    final = U.new_empty((programs, key_dim, value_dim))
    U, W, k_end = _rows(U), _rows(W), _rows(k_end)
    grid, options = _launch(U, key_dim, dot_dtype)
    if programs:
        _recurrence_fwd_kernel[grid](
            U,
            W,
            k_end,
            decay.contiguous(),
            initial_state.contiguous(),
            D,
            H,
            final,
            nchunks,
            chunk_size,
            key_dim,
            value_dim,
            *U.stride()[:3],
            *W.stride()[:3],
            *k_end.stride()[:3],
            **options,
        )
    return D, H, final


def _backward(
    dD: Tensor,
    dH: Tensor,
    dfinal: Tensor,
    W: Tensor,
    k_end: Tensor,
    decay: Tensor,
    dot_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dd, dS_next, dS_0): every dd_n (as D), every dS_{n+1} (as H), and dS_0."""
    programs, nchunks, chunk_size, value_dim = dD.shape
    key_dim = W.shape[-1]
    dd = torch.empty(dD.shape, dtype=dD.dtype, device=dD.device)
    ds_next = dD.new_empty((programs, nchunks, key_dim, value_dim))
    ds0 = dD.new_empty((programs, key_dim, value_dim))
    dD, dH, W, k_end = _rows(dD), _rows(dH), _rows(W), _rows(k_end)
    grid, options = _launch(dD, key_dim, dot_dtype)
    if programs:
        _recurrence_bwd_kernel[grid](
            dD,
            dH,
            dfinal.contiguous(),
            W,
            k_end,
            decay.contiguous(),
            dd,
            ds_next,
            ds0,
            nchunks,
            chunk_size,
            key_dim,
            value_dim,
            *dD.stride()[:3],
            *dH.stride()[:3],
            *W.stride()[:3],
            *k_end.stride()[:3],
            **options,
        )
    return dd, ds_next, ds0


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("megatron_hybrid::gated_delta_rule_recurrence", mutates_args=())
def _recurrence_op(
    U: Tensor,
    W: Tensor,
    k_end: Tensor,
    decay: Tensor,
    initial_state: Tensor,
    dot_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """The state carried over the chunks. Per program p (batch row * value head): U (p, N, C, V),
    W and k_end (p, N, C, K; k_end row s = e^{G_C - G_s} k_s), decay (p, N), initial_state
    (p, K, V), all in the compute dtype; dot_dtype: the matmul operands' dtype (module
    docstring). Returns D (p, N, C, V), H (p, N, K, V) and the final state (p, K, V)."""
    return _forward(U, W, k_end, decay, initial_state, dot_dtype)


@_recurrence_op.register_fake
def _(U, W, k_end, decay, initial_state, dot_dtype):
    programs, nchunks, _, value_dim = U.shape
    key_dim = W.shape[-1]
    return (
        U.new_empty(U.shape),
        U.new_empty((programs, nchunks, key_dim, value_dim)),
        U.new_empty((programs, key_dim, value_dim)),
    )


@torch.library.custom_op("megatron_hybrid::gated_delta_rule_recurrence_backward", mutates_args=())
def _recurrence_backward_op(
    dD: Tensor,
    dH: Tensor,
    dfinal: Tensor,
    W: Tensor,
    k_end: Tensor,
    decay: Tensor,
    dot_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dD, dH, dfinal, W, k_end, decay, dot_dtype)


@_recurrence_backward_op.register_fake
def _(dD, dH, dfinal, W, k_end, decay, dot_dtype):
    return dD.new_empty(dD.shape), dD.new_empty(dH.shape), dD.new_empty(dfinal.shape)


def _setup(ctx, inputs, output):
    _, W, k_end, decay, _, dot_dtype = inputs
    D, H, _ = output
    ctx.save_for_backward(W, k_end, decay, D, H)
    ctx.dot_dtype = dot_dtype


def _grad(ctx, dD, dH, dfinal):
    W, k_end, decay, D, H = ctx.saved_tensors
    dd, ds_next, ds0 = _recurrence_backward_op(dD, dH, dfinal, W, k_end, decay, ctx.dot_dtype)
    dW = -(dd @ H.transpose(-1, -2))  # -dd_n S_n^T
    dk_end = D @ ds_next.transpose(-1, -2)  # (dS_{n+1} d_n^T)^T
    ddecay = (ds_next * H).sum((-2, -1))  # <dS_{n+1}, S_n>
    return dd, dW, dk_end, ddecay, ds0, None


_recurrence_op.register_autograd(_grad, setup_context=_setup)


def _carry_state(rule: ChunkedRule, dot_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """D, H (B, H, group, N, ., V) and the final state (B, H, group, K, V) of `rule` through
    the custom op, which sees batch rows and value heads as one dim."""
    batch, key_heads, group, nchunks, chunk_size, value_dim = rule.U.shape
    key_dim = rule.W.shape[-1]
    programs = batch * key_heads * group
    D, H, final = _recurrence_op(
        rule.U.reshape(programs, nchunks, chunk_size, value_dim),
        rule.W.reshape(programs, nchunks, chunk_size, key_dim),
        rule.k_to_end.transpose(-1, -2).reshape(programs, nchunks, chunk_size, key_dim),
        rule.chunk_decay.reshape(programs, nchunks),
        rule.initial_state.reshape(programs, key_dim, value_dim),
        dot_dtype,
    )
    per_head = (batch, key_heads, group, nchunks)
    return (
        D.view(*per_head, chunk_size, value_dim),
        H.view(*per_head, key_dim, value_dim),
        final.view(batch, key_heads, group, key_dim, value_dim),
    )


# -- public function (the registry's `triton` implementation) -------------------------------------


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule with the chunk loop in Triton: the arguments, shapes, results and
    errors of kernels/gated_delta_rule/eager.py::chunk_gated_delta_rule (fla's convention).

    Raises:
        ValueError: as the eager op for shapes and chunk_size; and for dtypes other than
            float32, bfloat16, float16 and float64, or CPU tensors outside Triton's interpreter.
    """
    check_gated_delta_rule_args(
        q, k, v, g, beta, initial_state, chunk_size, name="gated_delta_rule=triton"
    )
    optional = {} if initial_state is None else {"initial_state": initial_state}
    check_inputs("gated_delta_rule", dtypes=_DTYPES, q=q, k=k, v=v, g=g, beta=beta, **optional)
    rule = prepare_chunks(q, k, v, g, beta, scale, initial_state, chunk_size)
    D, H, final = _carry_state(rule, _dot_dtype(q, k, v, rule.U.dtype))
    o = rule.sequence_output(rule.q_decayed @ H + rule.scores @ D)
    return o, rule.state_per_value_head(final) if output_final_state else None
