"""Rotary position embedding's cos and sin tables (rotate-half form, as Megatron and Hugging Face
Llama), plain or YaRN-scaled; the rotation itself is the `rotary` op (kernels/rotary/eager.py is
its reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def inverse_frequencies(dim: int, base: float, device: torch.device) -> torch.Tensor:
    """base^(-2i/dim) for the dim/2 rotating pairs, in float64."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim))


def cos_sin_tables(
    inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (times `scale`) of position * frequency for positions 0 .. seq_len - 1,
    shape (seq_len, 2 * len(inv_freq)) in `dtype`."""
    positions = torch.arange(seq_len, device=inv_freq.device)
    return cos_sin_at(inv_freq, positions, dtype, scale)


def cos_sin_at(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (times `scale`) of position * frequency, one row per entry of `positions` (a
    decoding step's rows sit at different positions), in `dtype`. Angles are computed in
    float64: in float32, position * frequency loses ~1e-2 rad at positions near 1e5."""
    angles = torch.outer(positions.to(torch.float64), inv_freq.to(torch.float64))
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rotary_cos_sin(
    seq_len: int, dim: int, base: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rotary cos and sin tables of shape (seq_len, dim) in `dtype`."""
    return cos_sin_tables(inverse_frequencies(dim, base, device), seq_len, dtype)


def rotary_cos_sin_at(
    positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rotary cos and sin tables of shape (len(positions), dim) in `dtype`."""
    return cos_sin_at(inverse_frequencies(dim, base, positions.device), positions, dtype)


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's attention-temperature factor 0.1 * mscale * ln(scale) + 1 (1 without extension)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class Yarn:
    """YaRN context extension (Peng et al. 2023) as Megatron-Core's YarnRotaryEmbedding applies
    it: frequencies that turn fewer than `beta_slow` times over the original context are
    interpolated (divided by `factor`), those turning more than `beta_fast` times are kept, a
    linear ramp between; cos and sin are scaled by the concentration factor."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float

    def inverse_frequencies(self, dim: int, base: float, device: torch.device) -> torch.Tensor:
        kept = inverse_frequencies(dim, base, device)
        low = math.floor(self._dim_turning(self.beta_fast, dim, base))
        high = math.ceil(self._dim_turning(self.beta_slow, dim, base))
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # Megatron's guard against a zero-width ramp
        ramp = (torch.arange(dim // 2, device=device, dtype=torch.float64) - low) / (high - low)
        keep = 1.0 - ramp.clamp(0, 1)  # 1: keep the frequency, 0: interpolate it
        return kept / self.factor * (1 - keep) + kept * keep

    def _dim_turning(self, rotations: float, dim: int, base: float) -> float:
        """The (fractional) pair index whose frequency turns `rotations` times over the original
        context."""
        context = self.original_max_position_embeddings
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    @property
    def concentration(self) -> float:
        """The factor cos and sin are multiplied by."""
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)


def rotary_per_row(rotary, x_BH1D: torch.Tensor, cos_BD: torch.Tensor, sin_BD: torch.Tensor):
    """The bound `rotary` op on a decoding step's single position per row, row b at the
    position of row b of the tables: the rows are passed as the op's time axis."""
    return rotary(x_BH1D.transpose(0, 2), cos_BD, sin_BD).transpose(0, 2)
