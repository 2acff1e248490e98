"""Rotary position embedding (rotate-half form, as Megatron and Hugging Face Llama) in plain
PyTorch: the eager reference of the `rotary` op (kernels/rotary/triton.py is the fast one). The
cos and sin tables are built by the attention layer (megatron_hybrid/layers/rotary.py)."""

from __future__ import annotations

import torch

from megatron_hybrid.kernels.dtypes import at_least_float32


def rotary(x_BHTD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of the last dim by position-dependent angles."""
    x = at_least_float32(x_BHTD)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos_TD + rotated * sin_TD).to(x_BHTD.dtype)
