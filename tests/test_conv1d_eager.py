"""causal_conv1d against the causal convolution sum written out as a loop, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid.kernels.conv1d.eager import causal_conv1d

# Same products, summed in a different order: float64 agrees to a few ulps.
TIGHT = dict(atol=1e-12, rtol=1e-12)


def loop_reference(x_BLC, weight_CK, bias_C=None):
    """y[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t - (K-1) + k, c], zero before t = 0."""
    batch, seqlen, channels = x_BLC.shape
    width = weight_CK.shape[1]
    y = torch.zeros_like(x_BLC)
    for t in range(seqlen):
        for k in range(width):
            source = t - (width - 1) + k
            if source >= 0:
                y[:, t] += weight_CK[:, k] * x_BLC[:, source]
        if bias_C is not None:
            y[:, t] += bias_C
    return y


def make_inputs(batch=2, seqlen=9, channels=5, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, seqlen, channels, generator=g, dtype=torch.float64),
        torch.randn(channels, width, generator=g, dtype=torch.float64),
        torch.randn(channels, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_matches_the_causal_sum_for_each_kernel_width(width):
    x, weight, bias = make_inputs(width=width)
    torch.testing.assert_close(
        causal_conv1d(x, weight, bias), loop_reference(x, weight, bias), **TIGHT
    )


def test_matches_the_causal_sum_without_bias():
    x, weight, _ = make_inputs()
    torch.testing.assert_close(causal_conv1d(x, weight), loop_reference(x, weight), **TIGHT)


def test_accepts_nn_conv1d_depthwise_weight_shape():
    x, weight, bias = make_inputs()
    torch.testing.assert_close(
        causal_conv1d(x, weight.unsqueeze(1), bias), loop_reference(x, weight, bias), **TIGHT
    )


def test_sequence_shorter_than_the_kernel_sees_only_zeros_before_it():
    x, weight, bias = make_inputs(seqlen=2, width=4)
    torch.testing.assert_close(
        causal_conv1d(x, weight, bias), loop_reference(x, weight, bias), **TIGHT
    )


def test_output_never_depends_on_the_future():
    x, weight, bias = make_inputs(seqlen=12)
    changed = x.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(
        causal_conv1d(changed, weight, bias)[:, :7],
        causal_conv1d(x, weight, bias)[:, :7],
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("activation", ["silu", "swish"])
def test_silu_and_swish_apply_silu_after_the_conv(activation):
    x, weight, bias = make_inputs()
    torch.testing.assert_close(
        causal_conv1d(x, weight, bias, activation=activation),
        F.silu(loop_reference(x, weight, bias)),
        **TIGHT,
    )


def test_output_is_contiguous_channels_last():
    x, weight, bias = make_inputs()
    y = causal_conv1d(x, weight, bias)
    assert y.shape == x.shape
    assert y.is_contiguous()


def test_gradients_pass_gradcheck():
    x, weight, bias = (
        t.requires_grad_() for t in make_inputs(batch=1, seqlen=5, channels=3, width=3)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b: causal_conv1d(x, w, b, activation="silu"), (x, weight, bias)
    )


def test_unknown_activation_raises_value_error():
    x, weight, bias = make_inputs()
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d(x, weight, bias, activation="relu")


@pytest.mark.parametrize(
    "x_shape, weight_shape, bias_shape, match",
    [
        ((9, 5), (5, 4), (5,), r"x has shape \(9, 5\)"),
        ((2, 9, 5), (6, 4), (5,), r"weight has shape \(6, 4\)"),
        ((2, 9, 5), (5, 2, 4), (5,), r"weight has shape \(5, 2, 4\)"),
        ((2, 9, 5), (5,), (5,), r"weight has shape \(5,\)"),
        ((2, 9, 5), (5, 4), (4,), r"bias has shape \(4,\)"),
    ],
    ids=["x_rank", "weight_channels", "weight_middle_dim", "weight_rank", "bias"],
)
def test_wrong_shapes_raise_value_error_naming_the_tensor(x_shape, weight_shape, bias_shape, match):
    with pytest.raises(ValueError, match=match):
        causal_conv1d(torch.ones(x_shape), torch.ones(weight_shape), torch.ones(bias_shape))
