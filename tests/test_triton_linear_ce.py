"""Fused linear + cross-entropy (kernels/linear_cross_entropy/triton.py) against the eager
reference (kernels/linear_cross_entropy/eager.py): the loss and the gradients of hidden and
weight, float32, bfloat16 and bf16 autocast over float32 tensors, ignored tokens, a tied
embedding weight, several token chunks and vocabulary blocks, plus torch.library.opcheck.

The reference is the eager op in float64 on the same input values. Every test backpropagates
GRAD_LOSS = 0.375, not 1, so the backward's scaling of the gradients stored by the forward is
checked too.

Tolerances:
- float32: the loss is a float32 sum over N tokens of logsumexp over V entries, each logit a
  float32 sum of H products; the gradients are float32 GEMMs over V (hidden) or N (weight)
  terms of d(logits). Measured here: loss within 3e-8 relative, gradients within 4e-7 of the
  tensor's largest entry. rtol 1e-5 and atol 1e-5 x that largest entry keep >10x margin
  (an entry near zero is a cancelling sum, so it gets the tensor's absolute scale, not its own).
- bfloat16 (and autocast): the kernel rounds the logits to bfloat16 as the output layer does in
  eager bfloat16, so the reference rounds them too (`reference(..., logits_dtype=bf16)`); what
  remains is d(logits) rounded to bfloat16 before the two gradient GEMMs (2^-8 relative per
  entry: truncated under the CPU interpreter, to nearest on GPU) and the gradients' own
  rounding. A gradient entry is a sum of many such terms of both signs: its worst case is 2 bf16
  ulp of itself plus 2^-8 of the sum of its terms' magnitudes, but the independent roundings
  mostly cancel. Measured over 3 seeds: at most 1.6e-3 of the tensor's largest entry beyond the
  2-ulp rtol (1.6e-2); atol 1/64 of the largest entry keeps ~10x margin. The loss is float32
  math on the same bfloat16 logits (measured within 1.4e-7 relative): rtol 1e-5 (a bf16 GEMM
  may round a logit the other way from the float64 reference; one ulp of one logit moves the
  mean loss by well under 1e-5 here).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, leaf, randn, require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.linear_cross_entropy import eager as eager_linear_ce  # noqa: E402
from megatron_hybrid.kernels.linear_cross_entropy import triton as triton_linear_ce  # noqa: E402
from megatron_hybrid.kernels.registry import resolve_kernels  # noqa: E402

GRAD_LOSS = 0.375
TOKENS, WIDTH, VOCAB = 37, 32, 200  # 200 = 3 full vocabulary blocks of 64 and a partial one
IGNORE = -100


@pytest.fixture(autouse=True)
def small_vocab_blocks(monkeypatch):
    """Vocabulary blocks of 64 so the online softmax runs over several (and a masked) block."""
    monkeypatch.setattr(triton_linear_ce, "_BLOCK_V", 64)


def make_inputs(dtype=torch.float32, tokens=TOKENS, width=WIDTH, vocab=VOCAB, seed=0):
    hidden = randn(tokens, width, dtype=dtype, seed=seed)
    weight = randn(vocab, width, dtype=dtype, seed=seed + 1, scale=0.3)  # logits ~ N(0, 1.7^2)
    generator = torch.Generator().manual_seed(seed + 2)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::4] = IGNORE
    return hidden, weight, labels.to(DEVICE)


def bf16_values(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().to(t.dtype)


def reference(hidden, weight, labels, ignore_index=IGNORE, logits_dtype=None):
    """eager linear_cross_entropy in float64 on the same values; with `logits_dtype`, the
    logits rounded to it as the output layer's GEMM rounds them in that dtype (gradient passed
    straight through)."""
    if logits_dtype is None:
        return eager_linear_ce.linear_cross_entropy(hidden, weight, labels, ignore_index)
    logits = F.linear(hidden, weight)
    logits = logits + (logits.to(logits_dtype).to(logits.dtype) - logits).detach()
    return F.cross_entropy(
        logits.reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=ignore_index
    )


def loss_and_grads(fn, hidden, weight, labels, *args, **kwargs):
    hidden, weight = leaf(hidden), leaf(weight)
    loss = fn(hidden, weight, labels, *args, **kwargs)
    (loss * GRAD_LOSS).backward()
    return loss, hidden.grad, weight.grad


def check(hidden, weight, labels, *args, dtype, logits_dtype=None, autocast=False):
    """The Triton op's loss and gradients equal the float64 reference on the same values,
    within the tolerances of the module docstring for `dtype`."""
    if autocast:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = loss_and_grads(
                triton_linear_ce.linear_cross_entropy, hidden, weight, labels, *args
            )
    else:
        out = loss_and_grads(triton_linear_ce.linear_cross_entropy, hidden, weight, labels, *args)
    ref = loss_and_grads(
        reference, hidden.double(), weight.double(), labels, *args, logits_dtype=logits_dtype
    )
    loss, grad_hidden, grad_weight = out
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad_hidden.dtype == hidden.dtype and grad_weight.dtype == weight.dtype
    torch.testing.assert_close(loss, ref[0].float(), rtol=1e-5, atol=1e-6)
    rtol, fraction = (1e-5, 1e-5) if dtype == torch.float32 else (1.6e-2, 1 / 64)
    for name, got, want in (("hidden", grad_hidden, ref[1]), ("weight", grad_weight, ref[2])):
        atol = fraction * want.abs().max().item()
        torch.testing.assert_close(
            got.double(),
            want,
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )


# -- against the reference ------------------------------------------------------------------------


def test_shapes_here_span_several_token_chunks():
    assert triton_linear_ce.chunk_tokens(TOKENS, VOCAB, torch.float32) == 4  # 10 chunks
    assert triton_linear_ce.chunk_tokens(TOKENS, VOCAB, torch.bfloat16) == 9  # 5 chunks


def test_matches_eager_fp32():
    check(*make_inputs(), dtype=torch.float32)


def test_matches_eager_bf16():
    check(*make_inputs(torch.bfloat16), dtype=torch.bfloat16, logits_dtype=torch.bfloat16)


def test_matches_eager_under_bf16_autocast_with_float32_tensors():
    # The trainer's setup: float32 hidden states and weight, bf16 autocast. The logits are
    # bf16 (as autocast's F.linear makes them), the gradients come back float32. The values are
    # bf16-representable so autocast's input casts are exact and the reference sees the same.
    hidden, weight, labels = make_inputs()
    check(
        bf16_values(hidden),
        bf16_values(weight),
        labels,
        dtype=torch.bfloat16,
        logits_dtype=torch.bfloat16,
        autocast=True,
    )


def test_matches_eager_with_batch_dims_and_another_ignore_index():
    hidden, weight, labels = make_inputs()
    labels = torch.where(labels == IGNORE, torch.zeros_like(labels), labels)  # 0 is ignored now
    check(
        hidden[:36].reshape(4, 9, WIDTH), weight, labels[:36].reshape(4, 9), 0, dtype=torch.float32
    )


def test_reads_strided_hidden_states_and_labels():
    # hidden: every other column of a wider tensor (the gradient flows back into it); labels:
    # a column of a (N, 2) tensor.
    hidden, weight, labels = make_inputs()
    wide = randn(TOKENS, 2 * WIDTH, seed=7)
    wide[:, ::2] = hidden
    all_labels = torch.stack((labels, labels.flip(0)), dim=1)
    assert not all_labels[:, 0].is_contiguous()

    def every_other_column(fn):
        return lambda wide, weight, labels: fn(wide[:, ::2], weight, labels)

    got = loss_and_grads(
        every_other_column(triton_linear_ce.linear_cross_entropy), wide, weight, all_labels[:, 0]
    )
    want = loss_and_grads(every_other_column(reference), wide.double(), weight.double(), labels)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_every_token_ignored_gives_nan_loss_and_zero_gradients_as_eager():
    hidden, weight, labels = make_inputs()
    loss, grad_hidden, grad_weight = loss_and_grads(
        triton_linear_ce.linear_cross_entropy, hidden, weight, torch.full_like(labels, IGNORE)
    )
    assert math.isnan(loss.item())
    assert not grad_hidden.any() and not grad_weight.any()
    eager_loss = eager_linear_ce.linear_cross_entropy(
        hidden, weight, torch.full_like(labels, IGNORE)
    )
    assert math.isnan(eager_loss.item())


def test_tied_embedding_weight_gets_both_gradients_once():
    # The weight both embeds the tokens and projects the output; its gradient is the sum of
    # the embedding's and the loss's, each counted once.
    hidden, weight, labels = make_inputs()
    tokens = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(5))
    tokens = tokens.to(DEVICE)

    def model_loss(fn, weight):
        h = torch.tanh(F.embedding(tokens, weight) * 3.0 + hidden)
        return fn(h, weight, labels)

    w = leaf(weight)
    (model_loss(triton_linear_ce.linear_cross_entropy, w) * GRAD_LOSS).backward()
    w_ref = leaf(weight.double())
    (model_loss(eager_linear_ce.linear_cross_entropy, w_ref) * GRAD_LOSS).backward()
    atol = 1e-5 * w_ref.grad.abs().max().item()
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-5, atol=atol)


def test_result_does_not_depend_on_the_chunking(monkeypatch):
    hidden, weight, labels = make_inputs()
    chunked = loss_and_grads(triton_linear_ce.linear_cross_entropy, hidden, weight, labels)
    monkeypatch.setattr(triton_linear_ce, "_CHUNK_FRACTION", 1)  # one chunk of all tokens
    assert triton_linear_ce.chunk_tokens(TOKENS, VOCAB, torch.float32) == TOKENS
    whole = loss_and_grads(triton_linear_ce.linear_cross_entropy, hidden, weight, labels)
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_without_grad_mode_only_the_loss_is_computed():
    hidden, weight, labels = make_inputs()
    with torch.no_grad():
        loss = triton_linear_ce.linear_cross_entropy(leaf(hidden), leaf(weight), labels)
    torch.testing.assert_close(
        loss, reference(hidden.double(), weight.double(), labels).float(), rtol=1e-5, atol=1e-6
    )


def test_frozen_weight_gets_no_gradient():
    hidden, weight, labels = make_inputs()
    h = leaf(hidden)
    triton_linear_ce.linear_cross_entropy(h, weight, labels).backward()
    h_ref = leaf(hidden.double())
    reference(h_ref, weight.double(), labels).backward()
    torch.testing.assert_close(
        h.grad.double(), h_ref.grad, rtol=1e-5, atol=1e-5 * h_ref.grad.abs().max().item()
    )


def test_rejects_mismatched_shapes():
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match="same H"):
        triton_linear_ce.linear_cross_entropy(hidden, weight[:, :8], labels)
    with pytest.raises(ValueError, match="labels have shape"):
        triton_linear_ce.linear_cross_entropy(hidden, weight, labels[:5])


def test_opcheck():
    hidden, weight, labels = make_inputs(tokens=9, vocab=40)
    op = triton_linear_ce._linear_cross_entropy_op
    torch.library.opcheck(
        op, (leaf(hidden), leaf(weight), labels, IGNORE, torch.float32, True, True)
    )
    torch.library.opcheck(op, (hidden, weight, labels, IGNORE, torch.float32, False, False))


def test_compiles_without_graph_breaks():
    hidden, weight, labels = make_inputs(tokens=9, vocab=40)

    def loss_fn(h, w, y):
        return triton_linear_ce.linear_cross_entropy(torch.tanh(h), w, y) * 2.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # fullgraph: no breaks
    got = loss_and_grads(compiled, hidden, weight, labels)
    want = loss_and_grads(loss_fn, hidden, weight, labels)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same kernels, same order


def test_registry_binds_triton_linear_cross_entropy():
    kernels = resolve_kernels({"linear_cross_entropy": "triton"}, "eager", DEVICE)
    assert kernels.linear_cross_entropy is triton_linear_ce.linear_cross_entropy


# -- real shapes on GPU ---------------------------------------------------------------------------

# Vocabulary 131072 (the Nemotron-H tokenizer's), hidden 2048, bf16 autocast over float32
# tensors as the trainer runs. Against a float32 eager reference on bf16-rounded logits: the
# weight gradient sums 4096 tokens and the hidden gradient 131072 vocabulary entries, so entries
# near zero get an absolute tolerance relative to the tensor's largest entry (1/64, as above).
GPU_TOKENS, GPU_WIDTH, GPU_VOCAB = 4096, 2048, 131072


def gpu_inputs(tokens, seed=0):
    # float32 tensors of bf16-representable values (autocast's input casts are then exact).
    hidden = bf16_values(randn(tokens, GPU_WIDTH, seed=seed))
    weight = bf16_values(randn(GPU_VOCAB, GPU_WIDTH, seed=seed + 1, scale=0.04))  # z ~ N(0, 1.8^2)
    generator = torch.Generator().manual_seed(seed + 2)
    labels = torch.randint(0, GPU_VOCAB, (tokens,), generator=generator)
    labels[::7] = IGNORE
    return hidden, weight, labels.to(DEVICE)


@pytest.mark.gpu
def test_matches_eager_at_vocab_131072_on_gpu():
    hidden, weight, labels = gpu_inputs(GPU_TOKENS)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = loss_and_grads(
            triton_linear_ce.linear_cross_entropy, hidden, weight, labels
        )
    ref = loss_and_grads(reference, hidden, weight, labels, logits_dtype=torch.bfloat16)
    torch.testing.assert_close(loss, ref[0], rtol=1e-4, atol=1e-5)
    for got, want in ((grad_hidden, ref[1]), (grad_weight, ref[2])):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=want.abs().max().item() / 64)


def loss_path_memory(fn, hidden, weight, labels) -> int:
    """Peak bytes allocated by forward + backward beyond the inputs and the two gradients that
    any implementation returns (hidden.grad, weight.grad)."""
    h, w = leaf(hidden), leaf(weight)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(h, w, labels)
    (loss * GRAD_LOSS).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    gradients = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
    return peak - baseline - gradients


@pytest.mark.gpu
def test_loss_path_memory_is_at_most_a_quarter_of_the_float32_logits_on_gpu():
    # 2 x 4096 tokens, the trainer's setup (float32 hidden states and weight, bf16 autocast).
    # What remains is one bf16 logits chunk (256 MiB) and the bf16 copy of the weight that
    # autocast's F.linear makes as well (512 MiB); eager holds several (N, V) float32 tensors.
    # Measured on an H100 (torch 2.11, triton 3.6): fused 776 MiB, eager 11744 MiB, against
    # 4096 MiB of float32 logits.
    tokens = 2 * GPU_TOKENS
    hidden, weight, labels = gpu_inputs(tokens)
    logits_bytes = tokens * GPU_VOCAB * 4
    fused = loss_path_memory(triton_linear_ce.linear_cross_entropy, hidden, weight, labels)
    eager = loss_path_memory(eager_linear_ce.linear_cross_entropy, hidden, weight, labels)
    print(
        f"loss-path memory beyond inputs and gradients: fused {fused / 2**20:.0f} MiB, eager "
        f"{eager / 2**20:.0f} MiB, float32 logits {logits_bytes / 2**20:.0f} MiB"
    )
    assert fused <= logits_bytes // 4
    assert fused < eager
