"""Dense MLP: squared-ReLU `fc2(relu(fc1(x))**2)` or SwiGLU `fc2(silu(gate) * up)`.

For SwiGLU, `linear_fc1` packs [gate; up] row-wise, as Megatron does (first half activated).
The module runs the `mlp` op its model bound (eager: kernels/mlp/eager.py, or `tiled`:
kernels/mlp/tiled.py) with the activation its model bound (kernels/activations/).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.kernels.activations.eager import fc1_width
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels


class MLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str,
        kernels: BoundKernels | None = None,
    ):
        super().__init__()
        kernels = kernels or eager_kernels()
        self.activation = activation
        self.act = kernels.activation(activation)
        self.kernel = kernels.mlp  # the bound `mlp` op: eager, or tiled over the tokens
        self.linear_fc1 = nn.Linear(hidden_size, fc1_width(ffn_hidden_size, activation), bias=False)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.linear_fc1, self.linear_fc2, self.act)
