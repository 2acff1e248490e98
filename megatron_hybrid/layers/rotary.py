"""Rotary position embedding's cos and sin tables (rotate-half form, as Megatron and Hugging Face
Llama); the rotation itself is the `rotary` op (kernels/rotary/eager.py is its reference)."""

from __future__ import annotations

import torch


def rotary_cos_sin(
    seq_len: int, dim: int, base: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, dim) in `dtype`, for positions 0 .. seq_len - 1."""
    positions = torch.arange(seq_len, device=device)
    return rotary_cos_sin_at(positions, dim, base, dtype)


def rotary_cos_sin_at(
    positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (len(positions), dim) in `dtype`, one row per position (a
    decoding step's rows sit at different positions). Angles are computed in float64: in
    float32, position * frequency loses ~1e-2 rad at positions near 1e5."""
    device = positions.device
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))
    angles = torch.outer(positions.to(torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)
