"""Precision policy shared by the eager kernels and the layers: numerically sensitive math (norm
statistics, rotary angles, router scores) runs in float32 for half-precision inputs and keeps
float64 as float64, so float64 reference tests check the math itself, not float32 rounding."""

from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
