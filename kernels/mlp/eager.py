"""The dense MLP `linear_fc2(act(linear_fc1(x)))` in plain PyTorch: the eager reference of the
`mlp` op (kernels/mlp/tiled.py computes it over shards of the tokens)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def mlp(
    x: torch.Tensor,
    linear_fc1: nn.Module,
    linear_fc2: nn.Module,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`linear_fc2(act(linear_fc1(x)))`: the eager `mlp` op. It calls the layers themselves, so
    hooks on them (tensor parallelism's input and output redistribution) run."""
    return linear_fc2(act(linear_fc1(x)))
