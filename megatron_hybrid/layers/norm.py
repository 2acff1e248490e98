"""RMSNorm and Mamba2's gated, grouped RMSNorm (statistics in float32).

`rms_norm` and `gated_rms_norm` are the eager references; the modules call whichever
implementation their model bound (megatron_hybrid/kernels/registry.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.dtypes import at_least_float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dim; returns x's dtype."""
    x_f = at_least_float32(x)
    y = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + eps)
    return (y * at_least_float32(weight)).to(x.dtype)


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


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, kernels: BoundKernels | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.kernels = kernels or eager_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(self(residual + x), residual + x)`, fused where the bound kernel fuses it."""
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, group_size: int, eps: float,
                 kernels: BoundKernels | None = None):
        super().__init__()
        assert hidden_size % group_size == 0
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.kernels = kernels or eager_kernels()

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.kernels.gated_rms_norm(x, gate, self.weight, self.group_size, self.eps)
