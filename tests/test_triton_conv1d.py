"""Triton depthwise causal conv1d against its eager reference (kernels/conv1d/eager.py): forward
and the gradients of x, weight and bias, float32 and bfloat16, kernel widths 1..4, both weight
layouts, with and without bias, SiLU and no activation, plus torch.library.opcheck.

On CPU the kernels run under Triton's interpreter with tiny shapes, chosen to straddle its tiles
(8 time steps x 16 channels there): seqlen 13 and 20 channels are not multiples of either, and
the backward's two time chunks make dx of the first chunk read dpre of the second. With a GPU
the same tests run compiled, and the `gpu` test adds a real shape.

Reference and tolerances: tests/kernel_checks.py. Here every output or gradient element is a
float32 sum of at most B*L = 26 products (weight and bias gradients; y and dx: at most K + 1
terms), so float32 agrees within a few ulp of the terms (measured <= 3e-6 absolute on values of
order 1-10): rtol/atol 1e-5 holds with margin. bfloat16: float32 results a few float32 ulp apart,
each rounded once to bfloat16: the 2-ulp bound, rtol 1.6e-2.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, assert_matches, leaf, randn, require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.conv1d import eager as eager_conv1d  # noqa: E402
from megatron_hybrid.kernels.conv1d import triton as triton_conv1d  # noqa: E402
from megatron_hybrid.kernels.registry import resolve_kernels  # noqa: E402

BATCH, SEQLEN, CHANNELS = 2, 13, 20
WIDTHS = [1, 2, 3, 4]
ACTIVATIONS = [None, "silu"]
# (weight layout, bias): every combination of (C, K) / nn.Conv1d's (C, 1, K) and bias / none.
LAYOUTS = [("CK", True), ("CK", False), ("C1K", True), ("C1K", False)]
LAYOUT_IDS = ["CK-bias", "CK-nobias", "C1K-bias", "C1K-nobias"]


def conv_inputs(width, layout, has_bias, dtype, seqlen=SEQLEN, channels=CHANNELS):
    x = randn(BATCH, seqlen, channels, dtype=dtype, scale=2.0)
    shape = (channels, width) if layout == "CK" else (channels, 1, width)
    inputs = [x, randn(*shape, dtype=dtype, seed=1)]
    if has_bias:
        inputs.append(randn(channels, dtype=dtype, seed=2))
    return inputs


def check(inputs, activation, dtype, **kwargs):
    """assert_matches, passing bias=None positionally when the inputs have no bias."""
    if len(inputs) == 3:
        assert_matches(
            triton_conv1d.causal_conv1d,
            eager_conv1d.causal_conv1d,
            inputs,
            activation,
            dtype=dtype,
            **kwargs,
        )
    else:

        def with_no_bias(fn):
            return lambda x, w, activation: fn(x, w, None, activation)

        assert_matches(
            with_no_bias(triton_conv1d.causal_conv1d),
            with_no_bias(eager_conv1d.causal_conv1d),
            inputs,
            activation,
            dtype=dtype,
            **kwargs,
        )


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "silu"])
@pytest.mark.parametrize("layout,has_bias", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("width", WIDTHS)
def test_causal_conv1d_matches_eager_fp32(width, layout, has_bias, activation):
    check(conv_inputs(width, layout, has_bias, torch.float32), activation, torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "silu"])
@pytest.mark.parametrize("width", WIDTHS)
def test_causal_conv1d_matches_eager_bf16(width, activation):
    # Mamba's case (nn.Conv1d weight, bias) for even widths, the other layout without bias for
    # odd ones (the fp32 test covers every combination).
    layout, has_bias = ("C1K", True) if width % 2 == 0 else ("CK", False)
    check(conv_inputs(width, layout, has_bias, torch.bfloat16), activation, torch.bfloat16)


def test_causal_conv1d_reads_a_strided_slice_over_several_time_blocks():
    # As in Mamba2: xBC is a slice of in_proj's packed output (time stride 32, not 20), and 40
    # steps make each backward program loop over several time blocks.
    packed = randn(BATCH, 40, 32)
    x = packed[..., 5:25]
    assert not x.is_contiguous()
    assert_matches(
        triton_conv1d.causal_conv1d,
        eager_conv1d.causal_conv1d,
        [x, randn(20, 1, 4, seed=1), randn(20, seed=2)],
        "silu",
        dtype=torch.float32,
    )


def test_causal_conv1d_is_causal():
    x, w, b = conv_inputs(4, "C1K", True, torch.float32)
    y = triton_conv1d.causal_conv1d(x, w, b, "silu")
    x_changed = x.clone()
    x_changed[:, 7:] += 1.0
    y_changed = triton_conv1d.causal_conv1d(x_changed, w, b, "silu")
    torch.testing.assert_close(y_changed[:, :7], y[:, :7], rtol=0, atol=0)
    assert not torch.equal(y_changed[:, 7:], y[:, 7:])


def test_causal_conv1d_rejects_widths_above_4_and_bad_arguments():
    x = randn(1, 5, 8)
    with pytest.raises(ValueError, match="kernel width 5 is not supported"):
        triton_conv1d.causal_conv1d(x, randn(8, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_conv1d.causal_conv1d(x, randn(8, 4), None, "relu")
    with pytest.raises(ValueError, match="weight has shape"):
        triton_conv1d.causal_conv1d(x, randn(7, 4))
    with pytest.raises(ValueError, match="bias has shape"):
        triton_conv1d.causal_conv1d(x, randn(8, 4), randn(7))


def test_causal_conv1d_opcheck():
    x, w, b = randn(2, 5, 4), randn(4, 3, seed=1), randn(4, seed=2)
    torch.library.opcheck(triton_conv1d._causal_conv1d_op, (leaf(x), leaf(w), leaf(b), True))
    torch.library.opcheck(triton_conv1d._causal_conv1d_op, (leaf(x), leaf(w), None, False))
    dy = randn(2, 5, 4, seed=3)
    torch.library.opcheck(triton_conv1d._causal_conv1d_backward_op, (dy, x, w, b, True))
    torch.library.opcheck(triton_conv1d._causal_conv1d_backward_op, (dy, x, w, None, False))


def test_backward_partials_stay_bounded_for_long_sequences():
    # The CUDA launch plan (computed without a GPU): at hybrid-1b's shape the tuned stretch is
    # kept; a 128k-token sequence gets longer stretches instead of 250 MB of partials.
    cuda = torch.device("cuda")
    for batch, seqlen in ((2, 4096), (1, 131072), (8, 1_000_000)):
        _, _, steps, programs = triton_conv1d._launch(cuda, 6144, seqlen, "bwd_", batch, 4)
        assert programs * steps >= seqlen and steps % 4 == 0
        assert batch * programs * 5 * 6144 * 4 <= triton_conv1d.MAX_PARTIAL_BYTES
    assert (
        triton_conv1d._launch(cuda, 6144, 4096, "bwd_", 2, 4)[2]
        == triton_conv1d.GPU_TUNING["bwd_time"]
    )


def test_registry_binds_triton_causal_conv1d():
    kernels = resolve_kernels({"causal_conv1d": "triton"}, "eager", DEVICE)
    assert kernels.impl("causal_conv1d") == "triton"
    assert kernels.causal_conv1d is triton_conv1d.causal_conv1d


# -- real shape on GPU ----------------------------------------------------------------------------

# 4 x 1024 x 4096, K = 4: the weight and bias gradients sum 4096 products per entry (up to ~260),
# so float32 reordering moves them before the bfloat16 rounding, and an entry near zero can round
# to a neighbour more than 2 ulp of itself away. Measured on an H100 (triton 3.6): y and dx within
# 2 bf16 ulp, weight and bias gradients within 3.1e-5 absolute of the reference. atol 1e-2 (as in
# the norms' GPU test) is margin for near-zero entries; everything else keeps the 2-ulp rtol.
GPU_TOLERANCE = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["none", "silu"])
def test_causal_conv1d_matches_eager_at_a_real_shape_on_gpu(activation):
    x = randn(4, 1024, 4096, dtype=torch.bfloat16)
    w, b = (
        randn(4096, 1, 4, dtype=torch.bfloat16, seed=1),
        randn(4096, dtype=torch.bfloat16, seed=2),
    )
    assert_matches(
        triton_conv1d.causal_conv1d,
        eager_conv1d.causal_conv1d,
        [x, w, b],
        activation,
        dtype=torch.bfloat16,
        tolerance=GPU_TOLERANCE,
    )
