"""The `moe.experts` op: eager (kernels/moe_experts/eager.py) and Triton grouped GEMM
(kernels/moe_experts/triton.py) against a float64 loop over experts, forward and the gradients
of x and both weights, float32 and bfloat16, squared ReLU and SwiGLU, uneven groups, experts
without tokens, rows routed to no expert; plus torch.library.opcheck and torch.compile.

On CPU the Triton kernels run under Triton's interpreter with tiny shapes chosen to straddle
its tiles (16 rows x 32 columns x 16 deep there): 32 hidden and 48 (96 for SwiGLU's [gate; up])
expert channels are not all multiples of the tile, groups of 7, 20 and 13 rows start inside
tiles. With a GPU the same tests run compiled, and the `gpu` tests add real shapes.

Reference: `reference_experts`, each expert's MLP on its rows in float64 on the same input
values. For bfloat16 it rounds where the kernels round (and how: tests/kernel_checks.py), since
a bf16 kernel must store fc1's output, the activation and d(fc1's output) in bf16 between its
GEMMs: h = fc1 x and act(h) in forward, dh = act'(h) * (dy fc2) in backward. Tolerances:
- float32: every element is a sum of at most 96 products (x, y, dx) or 20 rows (weight
  gradients), summed in another order: a few float32 ulp of the terms, rtol/atol 1e-5.
- bfloat16: the last rounding gives the 2-ulp rtol 1.6e-2 (kernel_checks.TOLERANCE). An
  intermediate can also round to the neighbouring bf16 value when the kernel's float32 sum and
  the float64 one straddle a rounding boundary; that moves a dependent sum by 2^-8 of one term
  (terms reach ~2 here: <= 8e-3), which only matters where the sum itself is near zero: atol
  1e-2. (Measured on CPU: no flip for these inputs; every element of every output and gradient
  within 7.8e-3 relative, one truncated bf16 ulp.)
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, TOLERANCE, leaf, randn, require_triton_kernels, round_to_bfloat16

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.activations.eager import activation_fn, fc1_width  # noqa: E402
from megatron_hybrid.kernels.moe_experts import eager as moe_eager  # noqa: E402
from megatron_hybrid.kernels.moe_experts import triton as triton_grouped_gemm  # noqa: E402
from megatron_hybrid.kernels.registry import resolve_kernels  # noqa: E402

HIDDEN, FFN = 32, 48
UNEVEN = [7, 0, 20, 13]  # an expert without tokens, groups that start inside row tiles
SPARE_ROWS = 3  # rows past the routed ones: no expert's, output and gradient zero
ACTIVATIONS = ["squared_relu", "swiglu"]
BF16_TOLERANCE = dict(rtol=1.6e-2, atol=1e-2)


class _RoundForward(torch.autograd.Function):
    """Round the value to bf16 as a kernel's store does; pass the gradient through."""

    @staticmethod
    def forward(ctx, t):
        return round_to_bfloat16(t.float()).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundBackward(torch.autograd.Function):
    """Identity; round the gradient to bf16 as the backward kernel stores it."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return round_to_bfloat16(grad.float()).to(grad.dtype)


def reference_experts(x, counts, fc1, fc2, activation, rounded):
    """Each expert's MLP on its rows, one expert at a time, in x's dtype (float64 here); with
    `rounded`, h, act(h) and dh rounded to bf16 where the kernels store them."""
    act = activation_fn(activation)
    outs, start = [], 0
    for e, count in enumerate(counts.tolist()):
        h = x[start : start + count] @ fc1[e].T
        if rounded:
            h = _RoundBackward.apply(_RoundForward.apply(h))
        a = act(h)
        if rounded:
            a = _RoundForward.apply(a)
        outs.append(a @ fc2[e].T)
        start += count
    outs.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
    return torch.cat(outs)


def expert_inputs(counts, activation, dtype, spare_rows=SPARE_ROWS, hidden=HIDDEN, ffn=FFN):
    """x, counts, fc1, fc2 with activations of order one (weights scaled by 1/sqrt(fan-in))."""
    num_experts, rows = len(counts), sum(counts) + spare_rows
    x = randn(rows, hidden, dtype=dtype)
    fc1 = randn(num_experts, fc1_width(ffn, activation), hidden, seed=1, scale=hidden**-0.5)
    fc2 = randn(num_experts, hidden, ffn, seed=2, scale=ffn**-0.5)
    return x, torch.tensor(counts, device=DEVICE), fc1.to(dtype), fc2.to(dtype)


def outputs_and_grads(fn, x, counts, fc1, fc2, activation, *extra):
    """fn's output and the gradients of x, fc1, fc2 under a bf16-representable output
    gradient (the same values for every dtype)."""
    x, fc1, fc2 = leaf(x), leaf(fc1), leaf(fc2)
    y = fn(x, counts, fc1, fc2, activation, *extra)
    dy = randn(*y.shape, dtype=torch.bfloat16, seed=100).to(y.dtype)
    return (y, *torch.autograd.grad(y, (x, fc1, fc2), dy))


def assert_matches_reference(fn, counts, activation, dtype, tolerance=None):
    inputs = expert_inputs(counts, activation, dtype)
    got = outputs_and_grads(fn, *inputs, activation)
    x, counts_t, fc1, fc2 = inputs
    want = outputs_and_grads(
        reference_experts,
        x.double(),
        counts_t,
        fc1.double(),
        fc2.double(),
        activation,
        dtype == torch.bfloat16,
    )
    tolerance = tolerance or (BF16_TOLERANCE if dtype == torch.bfloat16 else TOLERANCE[dtype])
    for name, g, w, original in zip(
        ["y", "dx", "dfc1", "dfc2"], got, want, [x, x, fc1, fc2], strict=True
    ):
        assert g.dtype == original.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w.to(g.dtype), **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    return got


# -- Triton ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_experts_match_the_reference(dtype, activation):
    y, dx, _, _ = assert_matches_reference(triton_grouped_gemm.experts, UNEVEN, activation, dtype)
    assert not y[-SPARE_ROWS:].any() and not dx[-SPARE_ROWS:].any()  # rows of no expert


def test_triton_experts_with_groups_on_and_across_tile_edges():
    # 16 rows = exactly one tile, 1 row, 33 = two tiles and one row; zero tokens last.
    assert_matches_reference(triton_grouped_gemm.experts, [16, 1, 33, 0], "swiglu", torch.float32)


def test_triton_experts_without_tokens_get_zero_weight_gradients():
    inputs = expert_inputs([0, 11, 0, 0, 5, 0], "squared_relu", torch.float32, spare_rows=0)
    _, dx, dfc1, dfc2 = outputs_and_grads(triton_grouped_gemm.experts, *inputs, "squared_relu")
    for e in (0, 2, 3, 5):
        assert not dfc1[e].any() and not dfc2[e].any()
    assert dfc1[1].any() and dfc2[4].any() and dx.all()


def test_triton_experts_with_no_tokens_at_all():
    x, counts, fc1, fc2 = expert_inputs([0, 0, 0], "swiglu", torch.float32, spare_rows=0)
    y, dx, dfc1, dfc2 = outputs_and_grads(
        triton_grouped_gemm.experts, x, counts, fc1, fc2, "swiglu"
    )
    assert y.shape == (0, HIDDEN) and dx.shape == (0, HIDDEN)
    assert not dfc1.any() and not dfc2.any()


def test_triton_experts_compute_in_the_autocast_dtype():
    # As F.linear under autocast: float32 tokens and weights are taken in bf16, the output is
    # bf16, and the float32 weights get float32 gradients (of the bf16 computation).
    x, counts, fc1, fc2 = expert_inputs(UNEVEN, "squared_relu", torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, dx, dfc1, dfc2 = outputs_and_grads(
            triton_grouped_gemm.experts, x, counts, fc1, fc2, "squared_relu"
        )
    assert y.dtype == torch.bfloat16 and dx.dtype == dfc1.dtype == dfc2.dtype == torch.float32
    bf16 = [t.to(torch.bfloat16) for t in (x, fc1, fc2)]
    want = outputs_and_grads(
        triton_grouped_gemm.experts, bf16[0], counts, *bf16[1:], "squared_relu"
    )
    for g, w in zip((y, dx, dfc1, dfc2), want, strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=0, atol=0)


def test_triton_experts_is_the_registered_implementation():
    kernels = resolve_kernels({"moe.experts": "triton"}, "eager", DEVICE)
    assert kernels["moe.experts"] is triton_grouped_gemm.experts


def test_triton_experts_opcheck():
    x, counts, fc1, fc2 = expert_inputs(
        [5, 0, 9], "swiglu", torch.float32, spare_rows=2, hidden=16, ffn=16
    )  # opcheck runs it ~10 times
    torch.library.opcheck(
        triton_grouped_gemm._experts_op, (leaf(x), counts, leaf(fc1), leaf(fc2), "swiglu")
    )
    _, hpre = triton_grouped_gemm._experts_op(x, counts, fc1, fc2, "swiglu")
    dy = randn(*x.shape, seed=3)
    torch.library.opcheck(
        triton_grouped_gemm._experts_backward_op, (dy, x, counts, fc1, fc2, hpre, "swiglu")
    )


def test_triton_experts_compile_without_graph_breaks():
    def routed(x, counts, fc1, fc2, activation):
        return triton_grouped_gemm.experts(x.sin(), counts, fc1, fc2, activation) * 2

    compiled = torch.compile(routed, fullgraph=True, backend="aot_eager")  # fullgraph: no breaks
    inputs = expert_inputs([4, 0, 6], "squared_relu", torch.float32, spare_rows=0)
    got = outputs_and_grads(compiled, *inputs, "squared_relu")
    want = outputs_and_grads(routed, *inputs, "squared_relu")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # same kernels, same order


# -- eager ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_eager_experts_match_the_reference(activation):
    assert_matches_reference(moe_eager.experts, UNEVEN, activation, torch.float32)


def test_eager_experts_compute_in_float32_and_return_the_input_dtype():
    # bf16 in, float32 math, bf16 out: the reference rounded only at the end (2-ulp rtol).
    x, counts, fc1, fc2 = expert_inputs(UNEVEN, "swiglu", torch.bfloat16)
    y = moe_eager.experts(x, counts, fc1, fc2, "swiglu")
    want = reference_experts(x.double(), counts, fc1.double(), fc2.double(), "swiglu", False)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want.to(torch.bfloat16), **TOLERANCE[torch.bfloat16])


def test_eager_experts_reject_counts_summing_past_the_tokens():
    x, _, fc1, fc2 = expert_inputs(UNEVEN, "squared_relu", torch.float32, spare_rows=0)
    with pytest.raises(ValueError, match="sums to 41, more than the 40 rows"):
        moe_eager.experts(x, torch.tensor([8, 0, 20, 13]), fc1, fc2, "squared_relu")


@pytest.mark.parametrize(
    "experts", [moe_eager.experts, triton_grouped_gemm.experts], ids=["eager", "triton"]
)
def test_experts_reject_fc1_without_room_for_the_swiglu_gate(experts):
    x, counts, fc1, fc2 = expert_inputs(UNEVEN, "squared_relu", torch.float32)
    with pytest.raises(
        ValueError,
        match=r"fc1_EFH has shape \(4, 48, 32\), expected "
        r"\(4, 96, 32\)",
    ):
        experts(x, counts, fc1, fc2, "swiglu")


# -- real shapes on GPU ---------------------------------------------------------------------------


# 16k tokens routed top-2 to 8 experts, Nemotron-H-like widths. The float32 reference on the GPU
# (no TF32) follows the kernels' rounding points; at these widths a rounding-boundary flip of an
# intermediate moves a sum by 2^-8 of one of its ~1000 terms, so the bound is the 2-ulp rtol,
# with atol one bf16 ulp (2^-8) of each tensor's largest magnitude for sums near zero.
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_experts_match_the_reference_at_real_shapes_on_gpu(dtype, activation):
    generator = torch.Generator().manual_seed(0)
    rows = 8192 if dtype == torch.float32 else 32768  # float32 (no TF32) runs on CUDA cores
    expert = torch.randint(0, 8, (rows,), generator=generator)
    counts = torch.bincount(expert, minlength=8).tolist()
    inputs = expert_inputs(counts, activation, dtype, spare_rows=0, hidden=2048, ffn=1024)
    got = outputs_and_grads(triton_grouped_gemm.experts, *inputs, activation)
    x, counts_t, fc1, fc2 = inputs
    want = outputs_and_grads(
        reference_experts,
        x.float(),
        counts_t,
        fc1.float(),
        fc2.float(),
        activation,
        dtype == torch.bfloat16,
    )
    for name, g, w in zip(["y", "dx", "dfc1", "dfc2"], got, want, strict=True):
        scale = w.abs().max().item()
        tolerance = (
            dict(rtol=1.6e-2, atol=scale * 2**-8)
            if dtype == torch.bfloat16
            else dict(rtol=1e-4, atol=scale * 1e-5)
        )
        torch.testing.assert_close(g, w.to(g.dtype), **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
def test_triton_experts_never_wait_for_the_host():
    inputs = expert_inputs([3000, 0, 5000, 1], "swiglu", torch.bfloat16, hidden=1024, ffn=512)
    x, counts, fc1, fc2 = (leaf(t) if t.is_floating_point() else t for t in inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        y = triton_grouped_gemm.experts(x, counts, fc1, fc2, "swiglu")
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
