"""Initialization rules that several specs (and the model outside its layers) use: Megatron-LM's
defaults. A rule returns a tensor's float32 CPU value from (shape, generator, config); the
generator is seeded from the tensor's canonical key (megatron_hybrid/init.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


def ones(shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig) -> torch.Tensor:
    """Norm weights and skip scales."""
    return torch.ones(shape)


def zeros(shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig) -> torch.Tensor:
    return torch.zeros(shape)


def normal(shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig) -> torch.Tensor:
    """N(0, init_method_std): input projections, embeddings, routers."""
    return torch.empty(shape).normal_(0.0, config.init_method_std, generator=generator)


def output_projection(
    shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig
) -> torch.Tensor:
    """N(0, init_method_std / sqrt(2 * layers)): a projection that writes into the residual
    stream, scaled down so the stream's variance does not grow with depth (Megatron's
    scaled_init_method_normal, counting canonical sub-layers)."""
    std = config.init_method_std / math.sqrt(2.0 * config.pattern.num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=generator)
