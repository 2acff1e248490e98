"""Dense MLP: squared-ReLU `fc2(relu(fc1(x))**2)` or SwiGLU `fc2(silu(gate) * up)`.

For SwiGLU, `linear_fc1` packs [gate; up] row-wise, as Megatron does (first half activated).
`activation_fn` and `mlp` are the eager references; the module runs the `mlp` op its model bound
(eager, or `tiled`: kernels/tiled_mlp.py) with the activation its model bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels


def activation_fn(name: str):
    """The elementwise part of the MLP for `name`, mapping fc1's output to fc2's input."""
    if name == "squared_relu":
        return lambda h: F.relu(h).square()
    if name == "swiglu":
        def swiglu(h: torch.Tensor) -> torch.Tensor:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return swiglu
    raise ValueError(f"unknown activation {name!r}; valid: squared_relu, swiglu")


def fc1_width(ffn_hidden_size: int, activation: str) -> int:
    """Rows of linear_fc1: doubled for gated activations."""
    return 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size


def mlp(x: torch.Tensor, linear_fc1: nn.Module, linear_fc2: nn.Module, act) -> torch.Tensor:
    """`linear_fc2(act(linear_fc1(x)))`: the eager `mlp` op. It calls the layers themselves, so
    hooks on them (tensor parallelism's input and output redistribution) run."""
    return linear_fc2(act(linear_fc1(x)))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str,
                 kernels: BoundKernels | None = None):
        super().__init__()
        kernels = kernels or eager_kernels()
        self.activation = activation
        self.act = kernels.activation(activation)
        self.kernel = kernels.mlp  # the bound `mlp` op: eager, or tiled over the tokens
        self.linear_fc1 = nn.Linear(hidden_size, fc1_width(ffn_hidden_size, activation), bias=False)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.linear_fc1, self.linear_fc2, self.act)
