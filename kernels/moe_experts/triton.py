"""MoE experts as Triton grouped GEMMs over tokens sorted by expert: the `triton` implementation
of the `moe.experts` op (semantics, shapes and precision: kernels/moe_experts/eager.py).

No host sync: the per-expert token counts stay on the device. Two kernels do all the work:

- `_rows_kernel`, out[rows of e] = A[rows of e] @ W[e]: programs walk a schedule of row tiles
  sized for the worst case (ceil(T / BLOCK_M) + E tiles, since each expert wastes at most one
  partial tile); each tile's expert comes from a device-side searchsorted over the experts'
  first tiles; a program masks the rows past its expert's end, and one past the last tile runs
  no K iterations. Used four times: fc1 and fc2 forward, and the input gradients through fc2
  and fc1. Optional epilogues fuse the activation (forward) and its derivative (backward).
- `_weight_grad_kernel`, dW[e] = A[rows of e]^T @ B[rows of e]: one program per (expert,
  output tile), looping over that expert's rows (zero iterations, zero gradient, for an expert
  without tokens). Each dW element is one program's float32 sum: deterministic, no atomics.

Forward: h = fc1 x is rounded once to the compute dtype and kept for backward; the activation
is applied to that stored value (forward and backward see bit-identical activations), rounded,
and fed to fc2. Backward recomputes the activation from h in the epilogue of d(act) = dy fc2,
so nothing else is saved. Operands are in the compute dtype (bf16/fp16 on tensor cores, or
float32 honouring torch.backends.cuda.matmul.allow_tf32); every sum accumulates in float32.

Under TRITON_INTERPRET=1 (CPU tests) the operands of tl.dot are upcast to float32: the
interpreter (triton 3.9) multiplies bfloat16 operands as raw integers. bf16 x bf16 products are
exact in float32, so this changes no math, only where the rounding of the sums falls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.moe_experts.eager import check_experts_args, compute_dtype
from megatron_hybrid.kernels.triton_launch import check_inputs

_SQUARED_RELU, _SWIGLU = 0, 1
_ACTIVATION_CODE = {"squared_relu": _SQUARED_RELU, "swiglu": _SWIGLU}
# Epilogues of _rows_kernel.
_STORE, _FWD_ACT, _BWD_ACT = 0, 1, 2


@triton.jit
def _rows_kernel(
    X,
    W,
    OUT,
    HPRE,
    DHPRE,
    TILE_EXPERT,
    TILE_START,
    ROW_START,
    COUNTS,
    n_rows,
    N,
    K,
    max_row_tiles,
    n_tiles,
    k_tiles,
    gate_cols,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_hm,
    stride_dm,
    EPILOGUE: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """OUT[rows of e, :N] = X[rows of e, :K] @ W[e] (W[e] read as (K, N) through its strides).

    EPILOGUE _FWD_ACT (fc1): HPRE[:, :N] = round(acc) and, for SwiGLU, HPRE[:, gate_cols:] =
    round(acc of W's columns gate_cols + n) (GATED: a second accumulator); OUT = act(HPRE).
    EPILOGUE _BWD_ACT (d act = dy fc2): OUT = act(HPRE) again, DHPRE = act'(HPRE) * acc.
    """
    # Grouped ordering: GROUP_M row tiles share each column tile of W while it is in L2.
    pid = tl.program_id(0)
    in_group = GROUP_M * n_tiles
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(max_row_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    e = tl.load(TILE_EXPERT + pid_m)
    row_begin = tl.load(ROW_START + e) + (pid_m - tl.load(TILE_START + e)) * BLOCK_M
    row_end = tl.minimum(tl.load(ROW_START + e) + tl.load(COUNTS + e), n_rows)
    num_k = tl.where(row_begin < row_end, k_tiles, 0)  # none past the last row tile

    rows = row_begin + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = (
        W + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    )
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kt in range(0, num_k):
        k_ok = offs_k < K - kt * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if GATED:
            w_up = tl.load(
                w_ptrs + gate_cols * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = OUT + rows[:, None] * stride_om + cols[None, :]
    h_ptrs = HPRE + rows[:, None] * stride_hm + cols[None, :]
    if EPILOGUE == 0:
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        h = acc.to(HPRE.dtype.element_ty)
        tl.store(h_ptrs, h, mask=mask)
        g = h.to(tl.float32)
        if ACTIVATION == 0:
            r = tl.maximum(g, 0.0)
            a = r * r
        else:
            h_up = acc_up.to(HPRE.dtype.element_ty)
            tl.store(h_ptrs + gate_cols, h_up, mask=mask)
            a = g * tl.sigmoid(g) * h_up.to(tl.float32)
        tl.store(out_ptrs, a.to(OUT.dtype.element_ty), mask=mask)
    else:
        d_ptrs = DHPRE + rows[:, None] * stride_dm + cols[None, :]
        g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION == 0:
            r = tl.maximum(g, 0.0)
            a = r * r
            tl.store(d_ptrs, (2.0 * r * acc).to(DHPRE.dtype.element_ty), mask=mask)
        else:
            u = tl.load(h_ptrs + gate_cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            a = silu * u
            d_gate = acc * u * sig * (1.0 + g * (1.0 - sig))
            tl.store(d_ptrs, d_gate.to(DHPRE.dtype.element_ty), mask=mask)
            tl.store(d_ptrs + gate_cols, (acc * silu).to(DHPRE.dtype.element_ty), mask=mask)
        tl.store(out_ptrs, a.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(
    A,
    B,
    DW,
    ROW_START,
    COUNTS,
    n_rows,
    M,
    N,
    tiles_m,
    tiles_n,
    stride_am,
    stride_ac,
    stride_bm,
    stride_bc,
    stride_de,
    stride_dm,
    stride_dn,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """DW[e, :M, :N] = A[rows of e, :M]^T @ B[rows of e, :N]."""
    pid = tl.program_id(0)
    e = pid // (tiles_m * tiles_n)
    t = pid % (tiles_m * tiles_n)
    in_group = GROUP_M * tiles_n
    first_m = (t // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (t % in_group) % group_rows
    pid_n = (t % in_group) // group_rows

    row_start = tl.load(ROW_START + e)
    row_end = tl.minimum(row_start + tl.load(COUNTS + e), n_rows)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for start in range(row_start, row_end, BLOCK_K):
        rows = start + offs_k
        r_ok = rows < row_end
        rows = rows.to(tl.int64)
        a = tl.load(
            A + rows[:, None] * stride_am + offs_m[None, :] * stride_ac,
            mask=r_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            B + rows[:, None] * stride_bm + offs_n[None, :] * stride_bc,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    dw_ptrs = (
        DW
        + e.to(tl.int64) * stride_de
        + offs_m[:, None].to(tl.int64) * stride_dm
        + offs_n[None, :] * stride_dn
    )
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# -- launchers ------------------------------------------------------------------------------------


class _Launch:
    """Block sizes and dot settings for one device and compute dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.upcast = device.type != "cuda"  # the interpreter (module docstring)
        tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
        self.precision = "tf32" if tf32 and not self.upcast else "ieee"
        if device.type != "cuda":  # small tiles: tests straddle them with tiny shapes
            self.rows = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4)
            self.gated = self.rows
            self.weights = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4)
        else:
            block_k, stages = (64, 3) if dtype.itemsize == 2 else (32, 3)
            self.rows = dict(
                BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=stages
            )
            # Two accumulators (gate and up): half the width keeps the registers of one.
            self.gated = dict(self.rows, BLOCK_N=64)
            self.weights = dict(
                BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=stages
            )


def _first(counts: Tensor) -> Tensor:
    """Exclusive cumulative sum, int32 on the device: each expert's first row (or tile)."""
    return torch.cumsum(counts, 0, dtype=torch.int32) - counts


def _rows_gemm(
    launch: _Launch,
    x: Tensor,
    w: Tensor,
    w_strides_ekn: tuple[int, int, int],
    counts: Tensor,
    out: Tensor,
    n: int,
    *,
    epilogue: int = _STORE,
    activation: int = _SQUARED_RELU,
    hpre: Tensor | None = None,
    dhpre: Tensor | None = None,
    gate_cols: int = 0,
) -> None:
    n_rows, k = x.shape
    num_experts = counts.shape[0]
    gated = epilogue == _FWD_ACT and activation == _SWIGLU
    config = launch.gated if gated else launch.rows
    tiles = (counts + config["BLOCK_M"] - 1) // config["BLOCK_M"]
    tile_start = _first(tiles)
    max_row_tiles = triton.cdiv(n_rows, config["BLOCK_M"]) + num_experts
    # Each row tile's expert: the last one starting at or before it (an expert without tokens
    # starts where the next one does). Tiles past the last are given the last expert, whose rows
    # they lie beyond.
    tile_expert = torch.searchsorted(
        tile_start + tiles,
        torch.arange(max_row_tiles, device=x.device, dtype=torch.int32),
        right=True,
        out_int32=True,
    )
    tile_expert.clamp_(max=num_experts - 1)
    n_tiles = triton.cdiv(n, config["BLOCK_N"])
    hpre = out if hpre is None else hpre
    dhpre = out if dhpre is None else dhpre
    _rows_kernel[(max_row_tiles * n_tiles,)](
        x,
        w,
        out,
        hpre,
        dhpre,
        tile_expert,
        tile_start,
        _first(counts),
        counts,
        n_rows,
        n,
        k,
        max_row_tiles,
        n_tiles,
        triton.cdiv(k, config["BLOCK_K"]),
        gate_cols,
        x.stride(0),
        x.stride(1),
        *w_strides_ekn,
        out.stride(0),
        hpre.stride(0),
        dhpre.stride(0),
        EPILOGUE=epilogue,
        ACTIVATION=activation,
        GATED=gated,
        UPCAST=launch.upcast,
        INPUT_PRECISION=launch.precision,
        GROUP_M=8,
        **config,
    )


def _weight_grad(launch: _Launch, a: Tensor, b: Tensor, counts: Tensor, dw: Tensor) -> None:
    num_experts, m, n = dw.shape
    config = launch.weights
    row_start = _first(counts)
    tiles_m, tiles_n = triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"])
    _weight_grad_kernel[(num_experts * tiles_m * tiles_n,)](
        a,
        b,
        dw,
        row_start,
        counts,
        a.shape[0],
        m,
        n,
        tiles_m,
        tiles_n,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        *dw.stride(),
        UPCAST=launch.upcast,
        INPUT_PRECISION=launch.precision,
        GROUP_M=8,
        **config,
    )


def _forward(
    x: Tensor, counts: Tensor, fc1: Tensor, fc2: Tensor, activation: str
) -> tuple[Tensor, Tensor]:
    n_rows, hidden = x.shape
    _, fc1_rows, _ = fc1.shape
    ffn = fc2.shape[2]
    counts = counts.to(device=x.device, dtype=torch.int32)
    launch = _Launch(x.device, x.dtype)
    code = _ACTIVATION_CODE[activation]
    hpre = torch.zeros(n_rows, fc1_rows, dtype=x.dtype, device=x.device)  # an output: defined
    act = torch.empty(n_rows, ffn, dtype=x.dtype, device=x.device)
    y = torch.zeros(n_rows, hidden, dtype=x.dtype, device=x.device)  # rows of no expert: 0
    if n_rows == 0 or counts.numel() == 0:
        return y, hpre
    # fc1: W[e] as (K=H, N=F') is fc1[e] transposed; for SwiGLU N is F, up F columns further.
    _rows_gemm(
        launch,
        x,
        fc1,
        (fc1.stride(0), fc1.stride(2), fc1.stride(1)),
        counts,
        act,
        ffn,
        epilogue=_FWD_ACT,
        activation=code,
        hpre=hpre,
        gate_cols=ffn,
    )
    _rows_gemm(launch, act, fc2, (fc2.stride(0), fc2.stride(2), fc2.stride(1)), counts, y, hidden)
    return y, hpre


def _backward(
    dy: Tensor, x: Tensor, counts: Tensor, fc1: Tensor, fc2: Tensor, hpre: Tensor, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    n_rows, hidden = x.shape
    ffn = fc2.shape[2]
    counts = counts.to(device=x.device, dtype=torch.int32)
    launch = _Launch(x.device, x.dtype)
    dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0 or counts.numel() == 0:
        return (
            dx,
            torch.zeros(fc1.shape, dtype=fc1.dtype, device=x.device),
            torch.zeros(fc2.shape, dtype=fc2.dtype, device=x.device),
        )
    dfc1 = torch.empty(fc1.shape, dtype=fc1.dtype, device=x.device)
    dfc2 = torch.empty(fc2.shape, dtype=fc2.dtype, device=x.device)
    act = torch.empty(n_rows, ffn, dtype=x.dtype, device=x.device)
    dhpre = torch.empty_like(hpre)
    # d act = dy fc2[e] (K=H, N=F), fused with act' -> dhpre, and act recomputed for dfc2.
    _rows_gemm(
        launch,
        dy,
        fc2,
        (fc2.stride(0), fc2.stride(1), fc2.stride(2)),
        counts,
        act,
        ffn,
        epilogue=_BWD_ACT,
        activation=_ACTIVATION_CODE[activation],
        hpre=hpre,
        dhpre=dhpre,
        gate_cols=ffn,
    )
    _weight_grad(launch, dy, act, counts, dfc2)  # dfc2[e] = dy_e^T act_e: (H, F)
    _rows_gemm(
        launch, dhpre, fc1, (fc1.stride(0), fc1.stride(1), fc1.stride(2)), counts, dx, hidden
    )  # dx = dhpre fc1[e] (K=F', N=H)
    _weight_grad(launch, dhpre, x, counts, dfc1)  # dfc1[e] = dhpre_e^T x_e: (F', H)
    return dx, dfc1, dfc2


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("megatron_hybrid::moe_experts", mutates_args=())
def _experts_op(
    x: Tensor, counts: Tensor, fc1: Tensor, fc2: Tensor, activation: str
) -> tuple[Tensor, Tensor]:
    """(y, h = fc1 x rounded to the compute dtype, kept for backward)."""
    return _forward(x, counts, fc1, fc2, activation)


@_experts_op.register_fake
def _(x, counts, fc1, fc2, activation):
    return x.new_empty(x.shape[0], fc2.shape[1]), x.new_empty(x.shape[0], fc1.shape[1])


@torch.library.custom_op("megatron_hybrid::moe_experts_backward", mutates_args=())
def _experts_backward_op(
    dy: Tensor, x: Tensor, counts: Tensor, fc1: Tensor, fc2: Tensor, hpre: Tensor, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, x, counts, fc1, fc2, hpre, activation)


@_experts_backward_op.register_fake
def _(dy, x, counts, fc1, fc2, hpre, activation):
    return x.new_empty(x.shape), fc1.new_empty(fc1.shape), fc2.new_empty(fc2.shape)


def _setup(ctx, inputs, output):
    x, counts, fc1, fc2, activation = inputs
    ctx.save_for_backward(x, counts, fc1, fc2, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.activation = activation


def _grad(ctx, dy, _dhpre):
    x, counts, fc1, fc2, hpre = ctx.saved_tensors
    dx, dfc1, dfc2 = _experts_backward_op(dy, x, counts, fc1, fc2, hpre, ctx.activation)
    return dx, None, dfc1, dfc2, None


_experts_op.register_autograd(_grad, setup_context=_setup)


# -- public function (the registry's `triton` implementation) -------------------------------------


def experts(
    x_sorted_TH: Tensor,
    tokens_per_expert_E: Tensor,
    fc1_EFH: Tensor,
    fc2_EHF: Tensor,
    activation: str,
) -> Tensor:
    """Every expert's MLP on its rows of the sorted tokens, without a host sync; the semantics,
    shapes, precision and errors of kernels/moe_experts/eager.py::experts, except that counts
    summing to more than T are not detected (that would need a sync): rows past T are never touched.

    Args:
        x_sorted_TH: (T, H) tokens sorted by expert, any strides.
        tokens_per_expert_E: (E,) integer counts on x's device.
        fc1_EFH: (E, F', H), F' = 2F for swiglu ([gate; up]), else F.
        fc2_EHF: (E, H, F).
        activation: "squared_relu" or "swiglu".

    Returns:
        y_sorted_TH (T, H) in the compute dtype; differentiable in x and both weights.
    """
    check_experts_args(
        x_sorted_TH, tokens_per_expert_E, fc1_EFH, fc2_EHF, activation, "moe.experts (triton)"
    )
    check_inputs("moe.experts", x_sorted_TH=x_sorted_TH, fc1_EFH=fc1_EFH, fc2_EHF=fc2_EHF)
    if tokens_per_expert_E.device != x_sorted_TH.device:
        raise ValueError(
            f"moe.experts (triton): tokens_per_expert_E is on "
            f"{tokens_per_expert_E.device}, x_sorted_TH on {x_sorted_TH.device}; "
            "keep the counts on the device (moving them would sync)"
        )
    dtype = compute_dtype(x_sorted_TH, fc1_EFH, fc2_EHF)
    return _experts_op(
        x_sorted_TH.to(dtype), tokens_per_expert_E, fc1_EFH.to(dtype), fc2_EHF.to(dtype), activation
    )[0]
