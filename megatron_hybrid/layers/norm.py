"""RMSNorm and Mamba2's gated, grouped RMSNorm (statistics in float32).

The modules call whichever implementation of the `rms_norm`, `add_rms_norm` and `gated_rms_norm`
ops their model bound (kernels/registry.py); the eager references are in kernels/norms/eager.py."""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels


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
    def __init__(
        self, hidden_size: int, group_size: int, eps: float, kernels: BoundKernels | None = None
    ):
        super().__init__()
        assert hidden_size % group_size == 0
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.kernels = kernels or eager_kernels()

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.kernels.gated_rms_norm(x, gate, self.weight, self.group_size, self.eps)
