"""The `eager` implementation of every registered op: plain PyTorch, the reference that every
other implementation is tested against. Each function is (or wraps) the one home of its math."""

from __future__ import annotations

import torch

from megatron_hybrid.kernels.conv1d_eager import causal_conv1d
from megatron_hybrid.kernels.linear_ce_eager import linear_cross_entropy
from megatron_hybrid.kernels.ssd_eager import ssd_chunked_scan as ssd
from megatron_hybrid.layers.mlp import activation_fn
from megatron_hybrid.layers.norm import gated_rms_norm, rms_norm
from megatron_hybrid.layers.rotary import apply_rotary as rotary

squared_relu = activation_fn("squared_relu")
swiglu = activation_fn("swiglu")

__all__ = ["add_rms_norm", "causal_conv1d", "gated_rms_norm", "linear_cross_entropy", "rms_norm",
           "rotary", "squared_relu", "ssd", "swiglu"]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(residual + x), residual + x)`: a block's residual add fused with the next
    norm. Both outputs have the promoted dtype of x and residual."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual
