"""Dense MLP: squared-ReLU `fc2(relu(fc1(x))**2)` or SwiGLU `fc2(silu(gate) * up)`.

For SwiGLU, `linear_fc1` packs [gate; up] row-wise, as Megatron does (first half activated).
`activation_fn` is the eager reference; the module calls the activation its model bound.
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


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str,
                 kernels: BoundKernels | None = None):
        super().__init__()
        self.activation = activation
        self.act = (kernels or eager_kernels()).activation(activation)
        self.linear_fc1 = nn.Linear(hidden_size, fc1_width(ffn_hidden_size, activation), bias=False)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))
