"""Triton squared-ReLU and SwiGLU activations against their eager references
(kernels/activations/eager.py): forward and gradient, float32 and bfloat16, plus
torch.library.opcheck.

On CPU the kernels run under Triton's interpreter with tiny shapes; with a GPU the same tests
run compiled, and the `gpu` tests add real shapes. Reference and tolerances:
tests/kernel_checks.py (elementwise math: float32 results agree to ~1 ulp; bfloat16 to the
2-ulp rounding bound).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_matches, leaf, outputs_and_grads, randn, require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.activations import eager as eager_activations  # noqa: E402
from megatron_hybrid.kernels.activations import triton as triton_activations  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
ACTIVATIONS = ["squared_relu", "swiglu"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_eager(name, dtype):
    # 2 x 7 x 2*37: odd widths and more elements than a swiglu column block holds at width 37.
    h = randn(2, 7, 74, dtype=dtype, scale=2.0)
    assert_matches(
        getattr(triton_activations, name), getattr(eager_activations, name), [h], dtype=dtype
    )


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_reads_a_strided_input(name):
    # Rows with a stride larger than their width (a slice of a wider buffer).
    h = randn(3, 5, 30)[..., 2:22]
    assert not h.is_contiguous()
    assert_matches(
        getattr(triton_activations, name),
        getattr(eager_activations, name),
        [h],
        dtype=torch.float32,
    )


def test_activation_of_the_experts_packed_buffer_keeps_padding_rows_zero():
    # GroupedExperts pads each expert's rows with zeros: relu(0)^2 = silu(0) * 0 = 0.
    h = randn(4, 3, 16)
    h[:, 1:] = 0
    for name in ACTIVATIONS:
        out = getattr(triton_activations, name)(h)
        assert out[:, 1:].abs().max() == 0


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match=r"h has shape \(2, 5\); the last dim must be even"):
        triton_activations.swiglu(randn(2, 5))


def test_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    # A model bound for CUDA and then run on CPU: a clear error, not a crash inside Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"h is on cpu; Triton kernels need CUDA tensors"):
        triton_activations.squared_relu(torch.randn(4))


def test_activation_opchecks():
    h = randn(3, 2, 10)
    torch.library.opcheck(triton_activations._squared_relu_op, (leaf(h),))
    torch.library.opcheck(
        triton_activations._squared_relu_backward_op, (randn(3, 2, 10, seed=1), h)
    )
    torch.library.opcheck(triton_activations._swiglu_op, (leaf(h),))
    torch.library.opcheck(triton_activations._swiglu_backward_op, (randn(3, 2, 5, seed=1), h))


def test_activations_compile_without_graph_breaks():
    def mlp_activations(h):
        return triton_activations.swiglu(h) + triton_activations.squared_relu(h[..., ::2])

    compiled = torch.compile(mlp_activations, fullgraph=True, backend="aot_eager")
    out_c, grads_c = outputs_and_grads(compiled, [randn(2, 3, 8)])
    out_e, grads_e = outputs_and_grads(mlp_activations, [randn(2, 3, 8)])
    for c, e in zip((*out_c, *grads_c), (*out_e, *grads_e), strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)  # same kernels, same order


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_eager_at_real_shapes_on_gpu(name, dtype):
    # An MLP's fc1 output for 2 x 4096 tokens of a 4096-wide model: 16384 (x2 for SwiGLU).
    width = 2 * 16384 if name == "swiglu" else 16384
    h = randn(2, 4096, width, dtype=dtype, scale=2.0)
    # Elementwise: no sums, so the small-shape tolerances hold at any size.
    assert_matches(
        getattr(triton_activations, name), getattr(eager_activations, name), [h], dtype=dtype
    )
