"""Depthwise causal conv1d in plain PyTorch, channels-last (Mamba2's conv over [x, B, C])."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu", "swish")


def check_conv1d_args(
    x_BLC: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    name: str = "causal_conv1d",
) -> torch.Tensor:
    """Validate causal_conv1d's arguments (every implementation shares them) and return the
    weight as (channels, kernel_width). Raises ValueError naming the argument and its shape."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x_BLC.dim() != 3:
        raise ValueError(
            f"{name}: x has shape {tuple(x_BLC.shape)}, expected (batch, seqlen, channels)"
        )
    channels = x_BLC.shape[-1]
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != channels or weight.shape[1] == 0:
        raise ValueError(
            f"{name}: weight has shape {tuple(weight.shape)}, expected "
            f"(channels, kernel_width) or (channels, 1, kernel_width) with channels = {channels}"
        )
    if bias is not None and bias.shape != (channels,):
        raise ValueError(
            f"{name}: bias has shape {tuple(bias.shape)}, expected (channels,) = {(channels,)}"
        )
    return weight


def causal_conv1d(
    x_BLC: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution over time, then an optional SiLU.

    `y[b, t, c] = bias[c] + sum_{k<K} weight[c, k] * x[b, t - (K-1) + k, c]`, with x taken as
    zero before t = 0, so y_t never sees the future.

    Args:
        x_BLC: (batch, seqlen, channels).
        weight: (channels, kernel_width), or nn.Conv1d's depthwise (channels, 1, kernel_width).
        bias: optional (channels,).
        activation: None, or "silu" / "swish" (the same function).

    Returns:
        y (batch, seqlen, channels), contiguous, in x's dtype; differentiable in x, weight, bias.

    Raises:
        ValueError: an unknown activation, or x, weight or bias of the wrong shape.
    """
    weight = check_conv1d_args(x_BLC, weight, bias, activation)

    seqlen, channels = x_BLC.shape[1], x_BLC.shape[2]
    width = weight.shape[1]
    # Padding K-1 on both sides and keeping the first seqlen outputs is the causal conv; the
    # right padding's outputs are the ones that would look into the future.
    y_BCL = F.conv1d(
        x_BLC.transpose(1, 2), weight.unsqueeze(1), bias, padding=width - 1, groups=channels
    )[..., :seqlen]
    y_BLC = y_BCL.transpose(1, 2).contiguous()
    if activation is not None:
        y_BLC = F.silu(y_BLC)
    return y_BLC
