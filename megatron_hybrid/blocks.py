"""One physical block of the decoder: an optional sequence side and an optional channel side.

    x = x + sequence_mixer(sequence_norm(x))     if the block has a sequence mixer (M, G, *)
    x = x + channel_mixer(channel_norm(x))       if the block has a channel mixer (-, E)

Each mixer is what its symbol's spec builds (megatron_hybrid/specs/). In a block with both sides
the residual add and the second norm are one op (`add_rms_norm`), fused where the model's
kernels fuse it.

A stand-alone `M` is a block with only the sequence side, a stand-alone `-` one with only the
channel side, and a fusion group `[M-]` one block with both. Fused and unfused models therefore
differ only in how sub-layers are grouped into blocks, which is what lets checkpoints map between
them by renaming alone (megatron_hybrid/canonical.py gives every module its canonical name).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.pattern import SYMBOL_NAMES, channel_symbol, sequence_symbol
from megatron_hybrid.specs import IMPLEMENTED_SYMBOLS, SPECS, implemented_listing
from megatron_hybrid.specs.base import CHANNEL, SEQUENCE, Slots

# The module names of each side inside a block (canonical.py maps them to each spec's slots).
PHYSICAL_SLOTS = {
    SEQUENCE: Slots(norm="sequence_norm", mixer="sequence_mixer"),
    CHANNEL: Slots(norm="channel_norm", mixer="channel_mixer"),
}


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
                f"not implemented yet; implemented symbols: {implemented_listing()}"
            )


class Side(NamedTuple):
    """One sub-layer of a block: its symbol, pre-norm and mixer."""

    symbol: str
    norm: nn.Module
    mixer: nn.Module


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
            self.sequence_norm = RMSNorm(config.hidden_size, eps, kernels)
            self.sequence_mixer = SPECS[self.sequence_symbol].build(config, kernels)
        if self.channel_symbol is not None:
            self.channel_norm = RMSNorm(config.hidden_size, eps, kernels)
            self.channel_mixer = SPECS[self.channel_symbol].build(config, kernels)

    def sides(self) -> list[Side]:
        """The block's sub-layers in order (sequence side first)."""
        sides = []
        if self.sequence_symbol is not None:
            sides.append(Side(self.sequence_symbol, self.sequence_norm, self.sequence_mixer))
        if self.channel_symbol is not None:
            sides.append(Side(self.channel_symbol, self.channel_norm, self.channel_mixer))
        return sides

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        return self.residual(x_BTH, self.sequence_mixer if self.sequence_symbol else None)

    def residual(self, x_BTH: torch.Tensor, sequence_mixer) -> torch.Tensor:
        """The block's residual stream with `sequence_mixer` (a callable on the normed input) in
        the sequence side: the mixer's forward, its prefill or its decoding step."""
        if self.channel_symbol is None:
            return x_BTH + sequence_mixer(self.sequence_norm(x_BTH))
        if self.sequence_symbol is None:
            normed_BTH = self.channel_norm(x_BTH)
        else:
            mixed_BTH = sequence_mixer(self.sequence_norm(x_BTH))
            normed_BTH, x_BTH = self.channel_norm.add_and_norm(mixed_BTH, x_BTH)
        return x_BTH + self.channel_mixer(normed_BTH)

    # -- decoding (megatron_hybrid/layers/decoding.py) ------------------------------------------
    def prefill(self, x_BTH: torch.Tensor, lengths_B: torch.Tensor, capacity: int):
        """(forward over right-padded prompts, the sequence mixer's state or None)."""
        if self.sequence_symbol is None:
            return self(x_BTH), None
        states = []

        def prefill_mixer(normed_BTH):
            y, state = self.sequence_mixer.prefill(normed_BTH, lengths_B, capacity)
            states.append(state)
            return y

        return self.residual(x_BTH, prefill_mixer), states[0]

    def step(self, x_B1H: torch.Tensor, state) -> torch.Tensor:
        """One new position per row; the sequence mixer's `state` advances in place."""
        if self.sequence_symbol is None:
            return self(x_B1H)
        return self.residual(x_B1H, lambda normed: self.sequence_mixer.step(normed, state))

    def extra_repr(self) -> str:
        return f"block={self.block!r}"
