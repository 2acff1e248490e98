"""`MixerSpec`: everything the framework knows about one pattern symbol, in one object.

A spec is data: which module the symbol builds, which config fields it reads and how they are
checked, how each of its tensors is initialized, under which names it is checkpointed, how
tensor parallelism splits it, what it costs, and how its tensors map to other formats. Blocks,
config checks, initialization, canonical naming, FLOPs, tensor parallelism and the converters
look the symbol up in `megatron_hybrid.specs.SPECS` instead of branching on it.

Names inside a spec are *relative*: an init rule or a tensor-parallel entry names a tensor
inside the mixer (`in_proj.weight`), a key map names it inside the canonical layer
(`mixer.in_proj.weight`, `norm.weight`). Rules of two symbols can therefore never meet.

Nothing here imports torch.distributed: tensor-parallel plans are declarations, which
megatron_hybrid/parallel/tensor_parallel.py turns into DTensor styles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_hybrid.pattern import CHANNEL_MIXERS, SEQUENCE_MIXERS, SYMBOL_NAMES

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig
    from megatron_hybrid.kernels.registry import BoundKernels

SEQUENCE, CHANNEL = "sequence", "channel"


@dataclass(frozen=True)
class Slots:
    """The two module names of one sub-layer: its pre-norm and its mixer."""

    norm: str
    mixer: str


# -- initialization -------------------------------------------------------------------------------
# An init rule maps (shape, generator seeded from the tensor's canonical key, config) to the
# tensor's float32 CPU value (megatron_hybrid/init.py).
InitRule = Callable[[tuple[int, ...], torch.Generator, "ModelConfig"], torch.Tensor]


# -- tensor parallelism ---------------------------------------------------------------------------
# `parts(mixer)`: the sizes of the parts a packed tensor concatenates along dim 0, in order (each
# split over the ranks on its own: parallel/packed.py), or None for an unpacked one.
PackedParts = Callable[[nn.Module], tuple[int, ...] | None]


@dataclass(frozen=True)
class ColumnParallel:
    """The weight of a linear whose output features split over the ranks."""

    parts: PackedParts | None = None


@dataclass(frozen=True)
class RowParallel:
    """The weight of a linear whose input features split over the ranks; its output is summed
    over them onto the layout the block asks for (all-reduce, or reduce-scatter onto sequence
    slices)."""


@dataclass(frozen=True)
class SplitRows:
    """A parameter split along dim 0 (per packed part) that the mixer's forward reads directly:
    the forward runs on this rank's rows."""

    parts: PackedParts | None = None


@dataclass(frozen=True)
class Replicated:
    """A parameter every rank holds whole."""


@dataclass(frozen=True)
class ReplicatedSummedGradient:
    """A parameter every rank holds whole but applies to its own share of the work only (a norm
    weight that all of a mixer's heads share, the heads split over the ranks): each rank's
    gradient is a partial sum, summed over the ranks."""


@dataclass(frozen=True)
class SplitElsewhere:
    """A parameter that another parallel step splits (`where` names it)."""

    where: str


TensorParallelStyle = (
    ColumnParallel
    | RowParallel
    | SplitRows
    | Replicated
    | ReplicatedSummedGradient
    | SplitElsewhere
)


# Activations where a mixer's replicated part meets its split heads, each marked in the mixer by
# an identity submodule (`nn.Identity`) that tensor parallelism hooks.
@dataclass(frozen=True)
class EntersHeads:
    """A tensor every rank computes whole that this rank's heads then use (MLA's shared rope
    key): identity forward; in backward each rank's gradient is its heads' part of the sum,
    and the parts are summed over the ranks (Megatron's copy_to_tensor_model_parallel_region)."""


@dataclass(frozen=True)
class SumOverHeads:
    """A sum over heads that each rank took over its own heads, needed whole on every rank and
    outside the autograd graph (DSA's indexer-loss target): summed over the ranks in forward
    (Megatron's all-reduce of that target)."""


ActivationStyle = EntersHeads | SumOverHeads


@dataclass(frozen=True)
class TensorParallelPlan:
    """How tensor parallelism splits one mixer: a style per parameter (relative name), a style
    per marked activation (relative name of its identity submodule), and the config fields the
    tensor-parallel size must divide, as (field, command-line flag). Entries for tensors that
    a config's mixer lacks (optional parts) are skipped."""

    parameters: Mapping[str, TensorParallelStyle]
    divisible: tuple[tuple[str, str], ...] = ()
    activations: Mapping[str, ActivationStyle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))
        object.__setattr__(self, "activations", MappingProxyType(dict(self.activations)))

    @property
    def takes_local_input(self) -> bool:
        """Whether the mixer holds replicated parameters, which compute on plain tensors: under
        sequence parallelism its input is then the gathered sequence as a plain tensor (whose
        gradient the mixer's own reductions have already summed over the ranks)."""
        return any(isinstance(s, Replicated) for s in self.parameters.values())

    @property
    def reduces_output(self) -> bool:
        """Whether the mixer's output comes out of a row-parallel linear (so it lands on the
        layout the block asks for); otherwise it is replicated."""
        return any(isinstance(s, RowParallel) for s in self.parameters.values())


# -- key mapping to other checkpoint formats ------------------------------------------------------
Keys = tuple[str, ...] | Callable[["ModelConfig"], tuple[str, ...]]
Transform = Callable[[Sequence[torch.Tensor], "ModelConfig"], list[torch.Tensor]]


class KeyMappingError(ValueError):
    """Tensors that a key map cannot convert (their values contradict the config)."""


def unchanged(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
    return list(tensors)


@dataclass(frozen=True)
class KeyMap:
    """Our tensors `ours` <-> another format's tensors `theirs`, keys relative to the layer
    (ours: inside `decoder.layers.{i}`, canonical names). Keys are a tuple, or a function of
    the config for counts that depend on it (one tensor per expert). `to_theirs` and `to_ours`
    convert the lists in key order and are each other's exact inverse; `to_ours` raises
    KeyMappingError for values the config cannot hold."""

    ours: Keys
    theirs: Keys
    to_theirs: Transform = unchanged
    to_ours: Transform = unchanged

    def our_keys(self, config: ModelConfig) -> tuple[str, ...]:
        return self.ours(config) if callable(self.ours) else self.ours

    def their_keys(self, config: ModelConfig) -> tuple[str, ...]:
        return self.theirs(config) if callable(self.theirs) else self.theirs


def rename(ours: str, theirs: str) -> KeyMap:
    """One tensor under another name."""
    return KeyMap((ours,), (theirs,))


@dataclass(frozen=True)
class ForeignLayout:
    """One sub-layer of ours as one layer of another format: that format's name for the layer
    type, and the key maps that cover every tensor of the sub-layer."""

    layer_type: str
    key_maps: tuple[KeyMap, ...]


# -- the spec -------------------------------------------------------------------------------------
def checked_for_every_pattern(config: ModelConfig) -> None:
    """`check_config` of a mixer whose fields ModelConfig checks for every pattern."""


@dataclass(frozen=True)
class MixerSpec:
    """Everything the framework knows about the pattern symbol `symbol` (see the module
    docstring). Its name and kind (sequence or channel mixer) are the pattern language's
    (megatron_hybrid/pattern.py)."""

    symbol: str
    # The mixer module, built from the config with the model's bound kernels.
    build: Callable[[ModelConfig, BoundKernels], nn.Module]
    # ModelConfig fields (or derived properties) the mixer reads.
    config_fields: tuple[str, ...]
    # Validates those fields and fills their defaults; raises ConfigError.
    check_config: Callable[[ModelConfig], None]
    # Canonical checkpoint names of the sub-layer's norm and mixer (README, "Checkpoints").
    slots: Slots
    # Init rule of every parameter and persistent buffer of the mixer, by relative name.
    init_rules: Mapping[str, InitRule]
    tensor_parallel: TensorParallelPlan
    # Forward FLOPs per token of one sub-layer (config, seq_length), and its trainable
    # parameters (its pre-norm excluded); megatron_hybrid/flops.py states the conventions.
    forward_flops_per_token: Callable[[ModelConfig, int], float]
    parameter_count: Callable[[ModelConfig], int]
    # Hugging Face transformers' nemotron_h layer (checkpointing/hf_nemotron_h.py); None: the
    # format has no such layer.
    hf_nemotron_h: ForeignLayout | None = None

    def __post_init__(self) -> None:
        if self.symbol not in SYMBOL_NAMES:
            raise ValueError(
                f"spec for {self.symbol!r}, which is not a pattern symbol; "
                f"symbols: {' '.join(SYMBOL_NAMES)}"
            )
        object.__setattr__(self, "init_rules", MappingProxyType(dict(self.init_rules)))

    @property
    def name(self) -> str:
        return SYMBOL_NAMES[self.symbol]

    @property
    def kind(self) -> str:
        """SEQUENCE or CHANNEL."""
        if self.symbol in SEQUENCE_MIXERS:
            return SEQUENCE
        assert self.symbol in CHANNEL_MIXERS, self.symbol
        return CHANNEL
