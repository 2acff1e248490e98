"""Fused output projection + cross-entropy that never materializes the (N, V) logits.

The eager reference, and the one statement of the math, is
kernels/linear_cross_entropy/eager.py::linear_cross_entropy: the mean over non-ignored tokens of
`logsumexp(h @ W^T) - (h @ W^T)[label]`.

Because the loss is a scalar mean, d(loss)/d(logits) = (softmax(logits) - onehot(label)) / count
is known as soon as a token's logits are, so everything happens in the forward pass, chunk by
chunk over tokens (Liger-kernel style):

    logits_c  = h_c @ W^T                       torch matmul in the compute dtype (C, V)
    kernel    : per row, online-softmax logsumexp over V, the row's loss, and the row of
                logits_c overwritten in place by d(loss)/d(logits_c)  (float32 math)
    grad_h_c  = dlogits_c @ W                   rows of the hidden gradient, written once
    grad_W   += dlogits_c^T @ h_c               accumulated in float32

so at most one (C, V) chunk exists at a time. The backward only multiplies the stored gradients
by the incoming gradient of the loss (in place when eager: see `_grad`).

Precision: the compute dtype is the autocast dtype under autocast (what the model's F.linear
would use), else the promoted dtype of hidden and weight. Logits and d(logits) are rounded to
it (as eager logits are), the softmax, loss and scale are float32, the GEMMs accumulate in
float32, the weight gradient is summed over chunks in float32 and rounded once to the weight's
dtype.

Memory, beyond the inputs and the two gradients it returns: one (C, V) chunk in the compute
dtype, where C is chosen so the chunk is at most 1/8 of the float32 (N, V) logits and at most
CHUNK_BYTES; under autocast a compute-dtype copy of the weight (as autocast's F.linear makes);
with a half-precision weight a float32 (V, H) accumulator for its gradient.

Custom ops with fake kernels and a registered autograd formula, so torch.compile traces
through without graph breaks. On CPU tensors they run only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_hybrid.kernels.linear_cross_entropy.eager import check_linear_cross_entropy_args
from megatron_hybrid.kernels.triton_launch import check_inputs

CHUNK_BYTES = 256 * 1024 * 1024  # largest logits chunk (tokens x vocab in the compute dtype)
_CHUNK_FRACTION = 8  # a chunk is at most 1/8 of the float32 (N, V) logits
_BLOCK_V = 4096  # vocabulary entries per step of the softmax kernel
_ACCUMULATE_SLICE_BYTES = 32 * 1024 * 1024  # fallback accumulation: temporary per vocab slice


@triton.jit
def _cross_entropy_chunk_kernel(
    LOGITS,
    LABELS,
    LOSS,
    SCALE,
    n_vocab,
    stride_row,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row per program: loss = logsumexp(z) - z[label] (0 for an ignored row), and with
    WRITE_GRAD, z overwritten by (softmax(z) - onehot(label)) * scale (0 for an ignored row)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    # A label outside [0, V) is the caller's error (eager raises); read entry 0 rather than
    # outside the row.
    safe_label = tl.where(valid & (label >= 0) & (label < n_vocab), label, 0)

    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(z - m)
    for start in range(0, n_vocab, BLOCK_V):
        offs = start + cols
        z = tl.load(base + offs, mask=offs < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_label = tl.load(base + safe_label).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - z_label, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(SCALE), 0.0)
        for start in range(0, n_vocab, BLOCK_V):
            offs = start + cols
            mask = offs < n_vocab
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(z - lse) - tl.where(offs == safe_label, 1.0, 0.0)) * scale
            tl.store(base + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


# -- launcher -------------------------------------------------------------------------------------


def chunk_tokens(n_tokens: int, n_vocab: int, dtype: torch.dtype) -> int:
    """Tokens per logits chunk: at most 1/8 of the float32 (N, V) logits and CHUNK_BYTES,
    a multiple of 64 (GEMM-friendly) once it is that large, at least 1."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = min(CHUNK_BYTES, n_tokens * n_vocab * 4 // _CHUNK_FRACTION)
    chunk = max(1, budget // max(1, n_vocab * itemsize))
    if chunk >= 64:
        chunk -= chunk % 64
    return min(chunk, max(1, n_tokens))


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b with float32 accumulation, rounded once into out's dtype."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
        return
    if out.is_cuda and out.dtype == torch.float32:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError):  # a torch without mm's out_dtype
            pass
    out.copy_(torch.mm(a, b))


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc (float32) = (0 if first else acc) + a @ b, for a and b in any one dtype."""
    beta = 0 if first else 1
    if a.dtype == acc.dtype:
        torch.addmm(acc, a, b, beta=beta, out=acc)
        return
    if acc.is_cuda:
        try:  # bf16 x bf16 -> float32 in cuBLAS's epilogue, no temporary
            torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # a torch without addmm's float32 self/out_dtype
            pass
    rows = max(1, _ACCUMULATE_SLICE_BYTES // max(1, b.shape[1] * a.element_size()))
    for start in range(0, a.shape[0], rows):
        part = torch.mm(a[start : start + rows], b).float()
        if first:
            acc[start : start + rows].copy_(part)
        else:
            acc[start : start + rows].add_(part)


def _forward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    compute_dtype: torch.dtype,
    hidden_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    n_vocab, width = weight.shape
    h2 = hidden.reshape(-1, width)
    labels1 = labels.reshape(-1).contiguous()  # the kernel reads label n at LABELS + n
    n_tokens = h2.shape[0]
    device = hidden.device
    with torch.autocast(device.type, enabled=False):
        w = weight.to(compute_dtype)
        count = (labels1 != ignore_index).sum()
        scale = (1.0 / count.float()).reshape(1)  # inf when every token is ignored: unused then
        loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=device)
        grad_h = torch.empty(h2.shape if hidden_grad else (0,), dtype=hidden.dtype, device=device)
        grad_w_acc = torch.empty(
            weight.shape if weight_grad else (0,), dtype=torch.float32, device=device
        )
        if weight_grad and n_tokens == 0:
            grad_w_acc.zero_()
        chunk = chunk_tokens(n_tokens, n_vocab, compute_dtype)
        logits_buffer = torch.empty(
            min(chunk, n_tokens), n_vocab, dtype=compute_dtype, device=device
        )
        block_v = min(_BLOCK_V, triton.next_power_of_2(n_vocab))
        num_warps = 8 if block_v >= 2048 else 4
        write_grad = hidden_grad or weight_grad
        for start in range(0, n_tokens, chunk):
            end = min(start + chunk, n_tokens)
            h_c = h2[start:end].to(compute_dtype)
            logits = logits_buffer[: end - start]
            torch.mm(h_c, w.t(), out=logits)
            _cross_entropy_chunk_kernel[(end - start,)](
                logits,
                labels1[start:end],
                loss_rows[start:end],
                scale,
                n_vocab,
                logits.stride(0),
                ignore_index,
                WRITE_GRAD=write_grad,
                BLOCK_V=block_v,
                num_warps=num_warps,
            )
            if hidden_grad:
                _mm_into(grad_h[start:end], logits, w)
            if weight_grad:
                _accumulate_mm(grad_w_acc, logits.t(), h_c, first=start == 0)
        loss = loss_rows.sum() / count
    grad_w = grad_w_acc if weight.dtype == torch.float32 else grad_w_acc.to(weight.dtype)
    return loss, grad_h.view(hidden.shape) if hidden_grad else grad_h, grad_w


# -- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("megatron_hybrid::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    compute_dtype: torch.dtype,
    hidden_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, d(loss)/d(hidden) or empty, d(loss)/d(weight) or empty)."""
    return _forward(hidden, weight, labels, ignore_index, compute_dtype, hidden_grad, weight_grad)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, compute_dtype, hidden_grad, weight_grad):
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape if hidden_grad else (0,)),
        weight.new_empty(weight.shape if weight_grad else (0,)),
    )


def _setup(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.hidden_grad, ctx.weight_grad = inputs[5], inputs[6]


def _grad(ctx, grad_loss, _grad_hidden, _grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    if type(grad_weight) is torch.Tensor:
        # Eager: scale in place; a copy would double the weight gradient's memory at the start
        # of the model's backward. Only autograd holds these tensors (the public function drops
        # the op's gradient outputs), and a second backward through the same graph fails
        # autograd's saved-tensor version check instead of scaling twice.
        grad_hidden.mul_(grad_loss)
        grad_weight.mul_(grad_loss)
    else:
        # Traced (torch.compile, opcheck): AOTAutograd forbids mutating a forward output in the
        # backward graph; the compiler plans this memory itself.
        grad_hidden, grad_weight = grad_hidden * grad_loss, grad_weight * grad_loss
    return (
        grad_hidden if ctx.hidden_grad else None,
        grad_weight if ctx.weight_grad else None,
        None,
        None,
        None,
        None,
        None,
    )


_linear_cross_entropy_op.register_autograd(_grad, setup_context=_setup)


# -- public function (the registry's `triton` implementation) -------------------------------------


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight^T` against `labels` over the tokens whose label is
    not `ignore_index`, a float32 scalar, without materializing the logits; the same contract as
    kernels/linear_cross_entropy/eager.py::linear_cross_entropy (hidden (..., H), weight (V, H),
    labels of hidden's leading shape; NaN when every token is ignored).

    Gradients are computed in the forward pass when grad mode is on and the input requires
    them; with grad mode off (evaluation) only the loss is computed."""
    name = "linear_cross_entropy (triton)"
    check_linear_cross_entropy_args(hidden, weight, labels, name)
    check_inputs("linear_cross_entropy", hidden=hidden, weight=weight)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    grad_mode = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy_op(
        hidden,
        weight,
        labels,
        ignore_index,
        compute_dtype,
        grad_mode and hidden.requires_grad,
        grad_mode and weight.requires_grad,
    )
    return loss
