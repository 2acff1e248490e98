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


def split_keys(
    ours: str,
    parts: tuple[str, ...],
    sizes: Callable[[ModelConfig], tuple[int, ...]],
    separator: str = ".",
) -> KeyMap:
    """One tensor as several along dim 0, the part `p` under `ours + separator + p`, of
    `sizes(config)` rows in order (Megatron-Core's `in_proj.weight.z`, ...)."""

    def to_theirs(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
        return list(torch.split(tensors[0], list(sizes(config)), dim=0))

    def to_ours(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
        expected = sizes(config)
        found = tuple(t.shape[0] if t.dim() else 0 for t in tensors)
        if found != expected:
            raise KeyMappingError(
                f"parts {', '.join(parts)} have {found} rows, the config gives {expected}"
            )
        return [torch.cat(list(tensors), dim=0)]

    theirs = tuple(f"{ours}{separator}{part}" for part in parts)
    return KeyMap((ours,), theirs, to_theirs, to_ours)


def per_item_keys(ours: str, template: str, count: Callable[[ModelConfig], int]) -> KeyMap:
    """One tensor stacked along dim 0 as one tensor per item (an expert): item j under
    `template.format(j)`."""

    def theirs(config: ModelConfig) -> tuple[str, ...]:
        return tuple(template.format(j) for j in range(count(config)))

    def to_theirs(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
        return list(tensors[0].unbind(0))

    def to_ours(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise KeyMappingError(f"the {len(tensors)} items differ in shape: {sorted(shapes)}")
        return [torch.stack(list(tensors))]

    return KeyMap((ours,), theirs, to_theirs, to_ours)


@dataclass(frozen=True)
class ForeignLayout:
    """One sub-layer of ours as one layer of another format: that format's name for the layer
    type, and the key maps that cover every tensor of the sub-layer."""

    layer_type: str
    key_maps: tuple[KeyMap, ...]


# -- Megatron-Core's torch_dist checkpoints --------------------------------------------------------
# Megatron-Core builds its layers from a layer spec of its own ("local") modules or of Transformer
# Engine's ("te"); the two save some tensors under other names (TE fuses a pre-norm into the
# linear after it: `mixer.in_proj.layer_norm_weight`).
MEGATRON_LAYER_SPECS = ("local", "te")


@dataclass(frozen=True)
class ExtraState:
    """A module for which Megatron-Core saves an `_extra_state` object (TE's FP8 metadata; None
    for its local linears): `module`, relative to the layer; it exists when the sub-layer has
    our tensor `of`; `shards(config)`: how many objects along a leading axis (one per expert,
    `.../_extra_state/shard_{j}_{n}`), or None for one object."""

    module: str
    of: str
    shards: Callable[[ModelConfig], int] | None = None


@dataclass(frozen=True)
class MegatronCoreLayout:
    """One sub-layer in Megatron-Core's `torch_dist` checkpoints (checkpointing/megatron_core/).

    Keys are relative to the layer (`decoder.layers.{i}.`, the same canonical index there),
    ours canonical; every KeyMap maps one tensor of ours. `key_maps[layer_spec]` holds one map
    per tensor the sub-layer can have: how a Megatron-Core model of that layer spec saves it
    (what `to-megatron` writes; a load takes whichever spelling it finds). `read_also`: other
    spellings a load accepts (a packed tensor saved whole, one tensor per expert).
    `extra_state[layer_spec]`: the modules that save an `_extra_state` in that layer spec.
    `unsupported(config)`: why Megatron-Core builds this sub-layer of `config` otherwise (other
    tensors or other math), which the converter says when it refuses the model; None when the
    layout maps it."""

    key_maps: Mapping[str, tuple[KeyMap, ...]]
    extra_state: Mapping[str, tuple[ExtraState, ...]]
    read_also: tuple[KeyMap, ...] = ()
    unsupported: Callable[[ModelConfig], str | None] = lambda config: None

    def __post_init__(self) -> None:
        for field_name in ("key_maps", "extra_state"):
            value = getattr(self, field_name)
            if set(value) != set(MEGATRON_LAYER_SPECS):
                raise ValueError(
                    f"MegatronCoreLayout.{field_name} needs exactly the layer specs "
                    f"{MEGATRON_LAYER_SPECS}, got {tuple(value)}"
                )
            object.__setattr__(self, field_name, MappingProxyType(dict(value)))


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
    # Megatron-Core's torch_dist checkpoints (checkpointing/megatron_core/); None: the converter
    # refuses models with this symbol, naming it.
    megatron_core: MegatronCoreLayout | None = None

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
