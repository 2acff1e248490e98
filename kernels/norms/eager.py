"""RMSNorm, the residual add fused with it, and Mamba2's gated, grouped RMSNorm in plain PyTorch
(statistics in float32): the eager references of the `rms_norm`, `add_rms_norm` and
`gated_rms_norm` ops (kernels/norms/triton.py is the fast one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.kernels.dtypes import at_least_float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dim; returns x's dtype."""
    x_f = at_least_float32(x)
    y = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + eps)
    return (y * at_least_float32(weight)).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(residual + x), residual + x)`: a block's residual add fused with the next
    norm. Both outputs have the promoted dtype of x and residual."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """Mamba2's norm: `rms_norm(x * silu(gate))` with statistics per group of `group_size`
    channels (one group per B/C group, so tensor parallelism over groups needs no reduction)."""
    y = at_least_float32(x) * F.silu(at_least_float32(gate))
    *lead, channels = y.shape
    y = y.view(*lead, channels // group_size, group_size)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y.view(*lead, channels) * at_least_float32(weight)).to(x.dtype)
