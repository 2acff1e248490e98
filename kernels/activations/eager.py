"""The MLP activations in plain PyTorch: the eager references of the `activation.squared_relu`
and `activation.swiglu` ops (kernels/activations/triton.py is the fast one), and the fc1 width
each one reads.

A gated activation (SwiGLU) reads fc1's output as [gate; up] packed along the last dim, as
Megatron packs `linear_fc1` row-wise (the first half activated)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def squared_relu(h: torch.Tensor) -> torch.Tensor:
    """`relu(h)^2`."""
    return F.relu(h).square()


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` with `h = [gate; up]` along the last dim."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "squared_relu": squared_relu,
    "swiglu": swiglu,
}
GATED = frozenset({"swiglu"})


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise part of the MLP for `name`, mapping fc1's output to fc2's input."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


def fc1_width(ffn_hidden_size: int, activation: str) -> int:
    """Rows of linear_fc1: doubled for gated activations."""
    return 2 * ffn_hidden_size if activation in GATED else ffn_hidden_size
