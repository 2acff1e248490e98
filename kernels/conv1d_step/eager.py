"""One step of the depthwise causal conv1d in plain PyTorch: the eager reference of the
`causal_conv1d_step` op. The state holds the K-1 inputs before the new one, oldest first, so

    y[b, c] = act(bias[c] + sum_{k<K-1} weight[c, k] * state[b, c, k] + weight[c, K-1] * x[b, c])

is kernels/conv1d/eager.py::causal_conv1d at the position after the state's inputs. A state
filled with the last K-1 inputs of a prompt (zeros before its start) continues that conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.kernels.conv1d.eager import check_conv1d_args
from megatron_hybrid.kernels.dtypes import at_least_float32


def check_conv1d_step_args(x_BC, state_BCW, weight, bias, activation, name="causal_conv1d_step"):
    """Validate the step's arguments and return the weight as (channels, kernel_width)."""
    if x_BC.dim() != 2:
        raise ValueError(f"{name}: x has shape {tuple(x_BC.shape)}, expected (batch, channels)")
    weight = check_conv1d_args(x_BC.unsqueeze(1), weight, bias, activation, name)
    expected = (*x_BC.shape, weight.shape[1] - 1)
    if tuple(state_BCW.shape) != expected:
        raise ValueError(
            f"{name}: state has shape {tuple(state_BCW.shape)}, expected (batch, channels, "
            f"kernel_width - 1) = {expected}"
        )
    return weight


def causal_conv1d_step(
    x_BC: torch.Tensor,
    state_BCW: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """The conv's output for one new input, shifting it into `state` in place.

    Args:
        x_BC: (batch, channels), the new input.
        state_BCW: (batch, channels, kernel_width - 1), the previous inputs, oldest first;
            updated in place (its oldest input dropped, x appended).
        weight: (channels, kernel_width) or nn.Conv1d's (channels, 1, kernel_width).
        bias: optional (channels,); activation: None, "silu" or "swish".

    Returns:
        y (batch, channels) in x's dtype; the sum runs in float32 (float64 for float64 input).
    """
    weight = check_conv1d_step_args(x_BC, state_BCW, weight, bias, activation)
    window_BCK = torch.cat([state_BCW, x_BC.unsqueeze(-1).to(state_BCW.dtype)], dim=-1)
    y_BC = (at_least_float32(window_BCK) * at_least_float32(weight)).sum(-1)
    if bias is not None:
        y_BC = y_BC + at_least_float32(bias)
    state_BCW.copy_(window_BCK[..., 1:])
    if activation is not None:
        y_BC = F.silu(y_BC)
    return y_BC.to(x_BC.dtype)
