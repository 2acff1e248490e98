"""Which Megatron-Core key holds each tensor of ours, read off the mixer specs.

Each symbol's spec holds its sub-layer's Megatron-Core layout (`MixerSpec.megatron_core`,
megatron_hybrid/specs/base.py): per layer spec ("local" or "te") a KeyMap per tensor, other
spellings a load accepts, and the modules that save an `_extra_state`. Megatron-Core numbers
the layers of a hybrid model as we number canonical sub-layers (the pattern's symbols in order,
'|' ignored), so canonical layer i is its `decoder.layers.{i}`. Each multi-token-prediction
depth d (a '/' part; Megatron-Core's MultiTokenPredictionLayer) builds its layers from the same
layer spec, numbered from 0 under `mtp.layers.{d}.mtp_model_layer.layers.`, as ours are. The
tensors outside the layers have the same names in both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from megatron_hybrid.checkpointing.errors import CheckpointError, listing
from megatron_hybrid.checkpointing.key_mapping import (
    PlacedKeyMap,
    model_shapes,
)
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.specs import SPECS
from megatron_hybrid.specs.base import (
    MEGATRON_LAYER_SPECS,
    ExtraState,
    KeyMap,
    MegatronCoreLayout,
    rename,
)

_LAYERS = "decoder.layers."
_MTP_DEPTHS = "mtp.layers."
_MTP_LAYERS = "mtp_model_layer.layers."
# Outside the layers: the same names in both.
_MODEL_TENSORS = (
    "embedding.word_embeddings.weight",
    "decoder.final_norm.weight",
    "output_layer.weight",
)
_MODEL_MAPS = tuple(rename(key, key) for key in _MODEL_TENSORS)
# Outside the layers both layer specs have the same modules: the output layer is a
# ColumnParallelLinear (its `_extra_state` exists with tied embeddings too), and HybridStack
# builds its final norm as a TENorm whatever the layer spec (hybrid_block.py), which saves one.
_MODEL_EXTRA_STATE = dict.fromkeys(
    MEGATRON_LAYER_SPECS,
    (
        ExtraState("output_layer", of="embedding.word_embeddings.weight"),
        ExtraState("decoder.final_norm", of="decoder.final_norm.weight"),
    ),
)
_MODEL_LAYOUT = MegatronCoreLayout(
    key_maps=dict.fromkeys(MEGATRON_LAYER_SPECS, _MODEL_MAPS), extra_state=_MODEL_EXTRA_STATE
)
# An MTP depth's own modules (multi_token_prediction.py), relative to `mtp.layers.{d}.`: the same
# names in both. eh_proj is a column-parallel Megatron linear in both layer specs; the norms are
# TENorms in TE's spec, and in the local one ModelOpt's Norm, which drops TE's `_extra_state`
# (post_training/modelopt/layers.py).
_DEPTH_NORMS = ("enorm", "hnorm", "final_layernorm")
_DEPTH_LAYOUT = MegatronCoreLayout(
    key_maps=dict.fromkeys(
        MEGATRON_LAYER_SPECS,
        tuple(rename(f"{m}.weight", f"{m}.weight") for m in (*_DEPTH_NORMS, "eh_proj")),
    ),
    extra_state={
        "local": (ExtraState("eh_proj", of="eh_proj.weight"),),
        "te": tuple(ExtraState(m, of=f"{m}.weight") for m in (*_DEPTH_NORMS, "eh_proj")),
    },
)


class MegatronLayoutError(CheckpointError):
    """A model, or a checkpoint, that the Megatron-Core key tables cannot map."""


def part_layouts(config: ModelConfig) -> list[tuple[str, MegatronCoreLayout]]:
    """(prefix, layout) of every part of a model of `config`, keys relative to the prefix the
    same in both: the tensors outside the layers (""), every canonical layer of the main
    decoder (`decoder.layers.{i}.`), then per MTP depth d its own modules (`mtp.layers.{d}.`)
    and its layers (`mtp.layers.{d}.mtp_model_layer.layers.{j}.`). Raises MegatronLayoutError
    for symbols without a layout and for sub-layers whose config Megatron-Core builds otherwise
    (MegatronCoreLayout.unsupported)."""
    main, mtp = "".join(config.pattern.blocks), "".join(config.pattern.mtp_blocks)
    _check_symbols(config, main + mtp)
    layouts = [("", _MODEL_LAYOUT)]
    layouts += [(f"{_LAYERS}{i}.", SPECS[s].megatron_core) for i, s in enumerate(main)]
    for d in range(config.pattern.mtp_depths):
        depth = f"{_MTP_DEPTHS}{d}."
        layouts.append((depth, _DEPTH_LAYOUT))
        layouts += [
            (f"{depth}{_MTP_LAYERS}{j}.", SPECS[s].megatron_core) for j, s in enumerate(mtp)
        ]
    return layouts


def _check_symbols(config: ModelConfig, symbols: str) -> None:
    missing = sorted({s for s in symbols if SPECS[s].megatron_core is None})
    if missing:
        raise MegatronLayoutError(
            f"pattern {config.hybrid_layer_pattern!r} has {', '.join(map(repr, missing))}, whose "
            "spec gives no Megatron-Core layout (MixerSpec.megatron_core)"
        )
    reasons = {
        s: reason
        for s in sorted(set(symbols))
        if (reason := SPECS[s].megatron_core.unsupported(config))
    }
    if reasons:
        raise MegatronLayoutError(
            f"pattern {config.hybrid_layer_pattern!r} cannot be mapped to Megatron-Core: "
            + "; ".join(f"{s!r}: {reason}" for s, reason in reasons.items())
        )


@dataclass(frozen=True)
class _Candidates:
    """The spellings of one tensor of ours, in the order a load tries them."""

    ours: str
    maps: tuple[PlacedKeyMap, ...]


def _place(key_map: KeyMap, config: ModelConfig, prefix: str) -> PlacedKeyMap:
    placed = PlacedKeyMap.place(key_map, config, prefix, prefix)
    assert len(placed.ours) == 1, f"a Megatron-Core key map maps one tensor: {placed.ours}"
    return placed


def _candidates(config: ModelConfig) -> list[_Candidates]:
    """Every tensor of a model of `config` with its spellings: the "local" layer spec's first,
    then "te"'s, then the other spellings its spec accepts."""
    shapes = model_shapes(config)
    found: dict[str, list[PlacedKeyMap]] = {}

    def add(key_maps: Iterable[KeyMap], prefix: str) -> None:
        for key_map in key_maps:
            placed = _place(key_map, config, prefix)
            spellings = found.setdefault(placed.ours[0], [])
            if placed.ours[0] in shapes and all(p.theirs != placed.theirs for p in spellings):
                spellings.append(placed)

    for prefix, layout in part_layouts(config):
        for layer_spec in MEGATRON_LAYER_SPECS:
            add(layout.key_maps[layer_spec], prefix)
        add(layout.read_also, prefix)
    uncovered = sorted(k for k in shapes if not found.get(k))
    assert not uncovered, f"no Megatron-Core name for {uncovered}: check the specs' key maps"
    return [_Candidates(key, tuple(found[key])) for key in shapes]


def write_maps(config: ModelConfig, layer_spec: str) -> list[PlacedKeyMap]:
    """One map per tensor of ours: how a Megatron-Core model of `layer_spec` saves it."""
    if layer_spec not in MEGATRON_LAYER_SPECS:
        raise MegatronLayoutError(
            f"unknown Megatron-Core layer spec {layer_spec!r}; valid: {MEGATRON_LAYER_SPECS}"
        )
    shapes = model_shapes(config)
    maps = [
        _place(m, config, prefix)
        for prefix, layout in part_layouts(config)
        for m in layout.key_maps[layer_spec]
    ]
    maps = [m for m in maps if m.ours[0] in shapes]
    assert sorted(m.ours[0] for m in maps) == sorted(shapes), "a spec's key maps miss a tensor"
    return maps


def read_maps(config: ModelConfig, available: Iterable[str], source: str) -> list[PlacedKeyMap]:
    """One map per tensor of ours, each the first of its spellings whose keys are all in
    `available` (the checkpoint's model tensors). Raises MegatronLayoutError naming `source`
    and the keys when a tensor of ours has none of its spellings, or a tensor of the checkpoint
    is in no map (it belongs to a layer or option this version does not map)."""
    available = set(available)
    chosen, missing = [], []
    for tensor in _candidates(config):
        usable = [m for m in tensor.maps if set(m.theirs) <= available]
        if usable:
            chosen.append(usable[0])
        else:
            missing.append(f"{tensor.ours} (as {' or '.join(_shown(m) for m in tensor.maps)})")
    used = {key for m in chosen for key in m.theirs}
    unknown = sorted(available - used)
    lines = []
    if unknown:
        lines.append(
            f"  {len(unknown)} tensor(s) that no layer of pattern "
            f"{config.hybrid_layer_pattern!r} saves, from a layer or option this version does "
            f"not map: {listing(unknown)}"
        )
    if missing:
        lines.append(f"  {len(missing)} tensor(s) of the model missing: {listing(missing, 4)}")
    if lines:
        raise MegatronLayoutError(
            f"{source} does not hold the Megatron-Core model of pattern "
            f"{config.hybrid_layer_pattern!r}; nothing was loaded:\n" + "\n".join(lines)
        )
    return chosen


def _shown(placed: PlacedKeyMap) -> str:
    keys = placed.theirs
    return keys[0] if len(keys) == 1 else f"{keys[0]} ... ({len(keys)} keys)"


def extra_state_keys(config: ModelConfig, layer_spec: str) -> list[tuple[str, int | None]]:
    """(key, shards) of every `_extra_state` a Megatron-Core model of `layer_spec` saves:
    `{module}._extra_state`, one object, or `shards` of them along a leading axis."""
    shapes = model_shapes(config)

    def placed(states: Iterable[ExtraState], prefix: str) -> list[tuple[str, int | None]]:
        return [
            (f"{prefix}{s.module}._extra_state", s.shards(config) if s.shards else None)
            for s in states
            if f"{prefix}{s.of}" in shapes
        ]

    return [
        key
        for prefix, layout in part_layouts(config)
        for key in placed(layout.extra_state[layer_spec], prefix)
    ]
