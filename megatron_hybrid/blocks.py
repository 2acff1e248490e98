"""One physical block of the decoder: an optional sequence side and an optional channel side.

    x = x + sequence_mixer(input_layernorm(x))     if the block has a sequence mixer (M, *)
    x = x + channel_mixer(pre_mlp_layernorm(x))    if the block has a channel mixer (-, E)

In a block with both sides the residual add and the second norm are one op
(`add_rms_norm`), fused where the model's kernels fuse it.

A stand-alone `M` is a block with only the sequence side, a stand-alone `-` one with only the
channel side, and a fusion group `[M-]` one block with both. Fused and unfused models therefore
differ only in how sub-layers are grouped into blocks, which is what lets checkpoints map between
them by renaming alone (checkpointing/canonical.py).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.attention import SelfAttention
from megatron_hybrid.layers.mamba2 import Mamba2Mixer
from megatron_hybrid.layers.mlp import MLP
from megatron_hybrid.layers.moe import MoELayer
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.pattern import SYMBOL_NAMES, channel_symbol, sequence_symbol

IMPLEMENTED_SYMBOLS = frozenset("M*-E")


class UnsupportedLayerError(ValueError):
    """A pattern symbol that parses but has no implementation yet."""


def check_implemented(config: ModelConfig) -> None:
    """Raise UnsupportedLayerError naming the first symbol of the pattern (main decoder and MTP
    depths) that the framework cannot build yet."""
    pattern = config.pattern
    for symbol, count in pattern.layer_counts().items():
        if count and symbol not in IMPLEMENTED_SYMBOLS:
            position = config.hybrid_layer_pattern.index(symbol)
            raise UnsupportedLayerError(
                f"layer symbol {symbol!r} ({SYMBOL_NAMES[symbol]}) at position {position} of "
                f"pattern {config.hybrid_layer_pattern!r} is part of the pattern language but "
                f"not implemented yet; implemented symbols: M (Mamba2), * (attention), "
                f"- (MLP), E (MoE)"
            )
    if pattern.mtp_depths:
        raise UnsupportedLayerError(
            f"pattern {config.hybrid_layer_pattern!r} asks for {pattern.mtp_depths} "
            "multi-token-prediction depth(s) ('/'); MTP parses but is not implemented yet: "
            "drop the '/...' part"
        )


def build_sequence_mixer(symbol: str, config: ModelConfig,
                         kernels: BoundKernels | None = None) -> nn.Module:
    if symbol == "M":
        return Mamba2Mixer(config, kernels)
    if symbol == "*":
        return SelfAttention(config, kernels)
    raise UnsupportedLayerError(f"no sequence mixer for symbol {symbol!r}")


def build_channel_mixer(symbol: str, config: ModelConfig,
                        kernels: BoundKernels | None = None) -> nn.Module:
    if symbol == "-":
        return MLP(config.hidden_size, config.ffn_hidden_size, config.activation, kernels)
    if symbol == "E":
        return MoELayer(config, kernels)
    raise UnsupportedLayerError(f"no channel mixer for symbol {symbol!r}")


class HybridBlock(nn.Module):
    """A physical block built from a pattern block string: "M", "-", "*-", "ME", ..."""

    def __init__(self, block: str, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        kernels = kernels or eager_kernels()
        self.block = block
        self.sequence_symbol = sequence_symbol(block)
        self.channel_symbol = channel_symbol(block)
        eps = config.layernorm_epsilon
        if self.sequence_symbol is not None:
            self.input_layernorm = RMSNorm(config.hidden_size, eps, kernels)
            self.self_attention = build_sequence_mixer(self.sequence_symbol, config, kernels)
        if self.channel_symbol is not None:
            self.pre_mlp_layernorm = RMSNorm(config.hidden_size, eps, kernels)
            self.mlp = build_channel_mixer(self.channel_symbol, config, kernels)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        if self.channel_symbol is None:
            return x_BTH + self.self_attention(self.input_layernorm(x_BTH))
        if self.sequence_symbol is None:
            normed_BTH = self.pre_mlp_layernorm(x_BTH)
        else:
            mixed_BTH = self.self_attention(self.input_layernorm(x_BTH))
            normed_BTH, x_BTH = self.pre_mlp_layernorm.add_and_norm(mixed_BTH, x_BTH)
        return x_BTH + self.mlp(normed_BTH)

    def extra_repr(self) -> str:
        return f"block={self.block!r}"
