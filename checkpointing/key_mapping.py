"""Converting a canonical state dict to another checkpoint format and back, driven by tables.

A format is described by one `ForeignLayout` per pattern symbol (held by the symbol's spec,
e.g. `MixerSpec.hf_nemotron_h`: its key maps, keys relative to the layer) plus key maps for the
tensors outside the decoder layers. `layer_key_maps` places every layer's maps at the layer's
full keys; `to_theirs` and `to_ours` apply a list of placed maps in either direction. The
converters (checkpointing/hf_nemotron_h.py) add only what is not a per-tensor mapping: config
translation, file layout, tied embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.specs import SPECS, MixerSpec
from megatron_hybrid.specs.base import ForeignLayout, KeyMap, KeyMappingError, Transform

__all__ = [
    "KeyMappingError",
    "PlacedKeyMap",
    "model_shapes",
    "layer_key_maps",
    "to_ours",
    "to_theirs",
]


def _meta_model(config: ModelConfig):
    """A model of `config` on the meta device: its names and shapes, no memory."""
    from megatron_hybrid.model import HybridModel

    with torch.device("meta"):
        return HybridModel(config)


def model_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical key (parameters and persistent buffers) of a model of `config` and its
    shape."""
    state = _meta_model(config).state_dict()
    return {canonical_key(n, config.pattern): tuple(t.shape) for n, t in state.items()}


def parameter_keys(config: ModelConfig) -> set[str]:
    """The canonical keys of the parameters of a model of `config` (what an optimizer holds
    state for)."""
    return {canonical_key(n, config.pattern) for n, _ in _meta_model(config).named_parameters()}


@dataclass(frozen=True)
class PlacedKeyMap:
    """A key map at full keys: our canonical keys <-> their keys."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_theirs: Transform
    to_ours: Transform

    @classmethod
    def place(
        cls, key_map: KeyMap, config: ModelConfig, our_prefix: str = "", their_prefix: str = ""
    ) -> PlacedKeyMap:
        return cls(
            tuple(our_prefix + k for k in key_map.our_keys(config)),
            tuple(their_prefix + k for k in key_map.their_keys(config)),
            key_map.to_theirs,
            key_map.to_ours,
        )


def layer_key_maps(
    config: ModelConfig,
    layout_of: Callable[[MixerSpec], ForeignLayout | None],
    their_layer_prefix: str,
) -> list[PlacedKeyMap]:
    """The key maps of every canonical layer of the main decoder, in order: canonical layer i
    is their layer i, under `their_layer_prefix + "{i}."`. `layout_of(spec)` picks the format's
    layout from a spec; the config must only have symbols whose spec has one."""
    maps = []
    for i, symbol in enumerate("".join(config.pattern.blocks)):
        layout = layout_of(SPECS[symbol])
        assert layout is not None, f"no layout for {symbol!r}: check the config first"
        for key_map in layout.key_maps:
            maps.append(
                PlacedKeyMap.place(
                    key_map, config, f"decoder.layers.{i}.", f"{their_layer_prefix}{i}."
                )
            )
    return maps


def to_theirs(
    state: Mapping[str, torch.Tensor], maps: Iterable[PlacedKeyMap], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Our tensors -> theirs, map by map (every key of `maps` must be in `state`)."""
    return _apply(state, maps, config, forward=True)


def to_ours(
    state: Mapping[str, torch.Tensor], maps: Iterable[PlacedKeyMap], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Their tensors -> ours; the exact inverse of `to_theirs`. Raises KeyMappingError naming
    their keys when a map refuses the values."""
    return _apply(state, maps, config, forward=False)


def _apply(
    state: Mapping[str, torch.Tensor],
    maps: Iterable[PlacedKeyMap],
    config: ModelConfig,
    forward: bool,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for placed in maps:
        source, target = (placed.ours, placed.theirs) if forward else (placed.theirs, placed.ours)
        transform = placed.to_theirs if forward else placed.to_ours
        try:
            converted = transform([state[k] for k in source], config)
        except KeyMappingError as e:
            raise KeyMappingError(f"{', '.join(source)}: {e}") from None
        assert len(converted) == len(target), (source, target, len(converted))
        out.update(zip(target, converted, strict=True))
    return out
