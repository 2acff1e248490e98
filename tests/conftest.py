"""Shared test helpers: small model configs that build in milliseconds on a laptop CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernel tests run under Triton's interpreter, which triton.jit picks as
# each function is decorated, triton's own library included as triton is imported. Something
# may import triton while tests are collected (transformers does), so set it here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.init import tensor_generator


def small_config(pattern: str, **overrides) -> ModelConfig:
    """A tiny but complete config: every implemented mixer fits it."""
    fields = dict(
        hybrid_layer_pattern=pattern,
        hidden_size=32,
        vocab_size=64,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        mamba_state_dim=8,
        mamba_head_dim=8,
        mamba_num_groups=2,
        mamba_chunk_size=8,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def perturb_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` (a HybridModel) with every parameter moved off its initial value by noise of half
    its RMS (at least 0.01), drawn per canonical key: fused and unfused models of the same
    sub-layers get the same noise. The structured initial values (every norm weight and D one)
    would hide mistakes such as a block scaling by the wrong norm's weight."""
    for name, param in model.named_parameters():
        generator = tensor_generator(seed, canonical_key(name, model.config.pattern))
        scale = 0.5 * param.float().pow(2).mean().sqrt().clamp(min=0.02)
        param.add_(scale * torch.randn(param.shape, generator=generator).to(param))
    return model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
