"""Rotary position embedding (rotate-half form, as Megatron and Hugging Face Llama)."""

from __future__ import annotations

import torch

from megatron_hybrid.layers.dtypes import at_least_float32


def rotary_cos_sin(
    seq_len: int, dim: int, base: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, dim) in `dtype`. Angles are computed in float64:
    in float32, position * frequency loses ~1e-2 rad at positions near 1e5."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of the last dim by position-dependent angles."""
    x = at_least_float32(x_BHTD)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos_TD + rotated * sin_TD).to(x_BHTD.dtype)
