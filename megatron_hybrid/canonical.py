"""The one place where physical module names and canonical checkpoint keys meet.

A model's modules are grouped by *physical block* (`decoder.layers.{p}`, one per pattern block,
a fusion group counting once; inside it the sides' modules megatron_hybrid/blocks.py names);
checkpoints, parameter initialization and every tool speak *canonical keys*: the model as if
no fusion existed, indexed by canonical sub-layer, each sub-layer's norm and mixer under the
names its symbol's spec gives them (`MixerSpec.slots`; the README, section "Checkpoints"):

    decoder.layers.{p}.sequence_norm.*    -> decoder.layers.{s}.norm.*               (M)
    decoder.layers.{p}.sequence_mixer.*   -> decoder.layers.{s}.mixer.*              (M)
    decoder.layers.{p}.sequence_norm.*    -> decoder.layers.{s}.input_layernorm.*    (*)
    decoder.layers.{p}.sequence_mixer.*   -> decoder.layers.{s}.self_attention.*     (*)
    decoder.layers.{p}.channel_norm.*     -> decoder.layers.{c}.pre_mlp_layernorm.*  (-, E)
    decoder.layers.{p}.channel_mixer.*    -> decoder.layers.{c}.mlp.*                (-, E)

where s is the canonical index of the block's sequence sub-layer and c of its channel sub-layer
(c = s + 1 in a fused block). Names outside `decoder.layers` are the same in both spaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.blocks import PHYSICAL_SLOTS
from megatron_hybrid.pattern import SYMBOL_NAMES, HybridPattern, channel_symbol, sequence_symbol
from megatron_hybrid.specs import SPECS, MixerSpec
from megatron_hybrid.specs.base import SEQUENCE

_DECODER = ("decoder", "layers")
_PARTS = ("norm", "mixer")


class CanonicalKeyError(KeyError):
    """A name that does not belong to the model described by the pattern."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


@dataclass(frozen=True)
class LayerTensor:
    """A tensor of one canonical sub-layer: the sub-layer's index and symbol, the physical
    block holding it, `part` "norm" or "mixer", and `name`, the tensor's name inside that
    part (`weight`, `in_proj.weight`, ...)."""

    layer: int
    symbol: str
    block: int
    part: str
    name: str

    @property
    def spec(self) -> MixerSpec:
        return SPECS[self.symbol]


def canonical_key(physical_name: str, pattern: HybridPattern) -> str:
    """Map a parameter/buffer name of the model to its canonical checkpoint key."""
    tensor = _locate_physical(physical_name, pattern)
    if tensor is None:
        return physical_name
    slot = getattr(tensor.spec.slots, tensor.part)
    return ".".join((*_DECODER, str(tensor.layer), slot, tensor.name))


def physical_name(key: str, pattern: HybridPattern) -> str:
    """Inverse of `canonical_key` for the model described by `pattern`."""
    tensor = locate(key, pattern)
    if tensor is None:
        return key
    slot = getattr(PHYSICAL_SLOTS[tensor.spec.kind], tensor.part)
    return ".".join((*_DECODER, str(tensor.block), slot, tensor.name))


def locate(key: str, pattern: HybridPattern) -> LayerTensor | None:
    """Where the tensor under canonical `key` sits; None for names outside the decoder
    layers. Raises CanonicalKeyError for a key the pattern's model does not have."""
    split = _split_layer_name(key)
    if split is None:
        return None
    layer, slot, name = split
    if not 0 <= layer < pattern.num_layers:
        raise CanonicalKeyError(
            f"{key!r}: canonical layer {layer} does not exist in pattern {str(pattern)!r} "
            f"({pattern.num_layers} layers)"
        )
    block_index = pattern.physical_block(layer)
    block = pattern.blocks[block_index]
    symbol = block[pattern.canonical_layers(block_index).index(layer)]
    slots = _spec(symbol, key).slots
    for part in _PARTS:
        if slot == getattr(slots, part):
            return LayerTensor(layer, symbol, block_index, part, name)
    raise CanonicalKeyError(
        f"{key!r}: canonical layer {layer} is {symbol!r} ({SYMBOL_NAMES[symbol]}), whose "
        f"slots are {slots.norm!r} and {slots.mixer!r}, not {slot!r}"
    )


def _locate_physical(name: str, pattern: HybridPattern) -> LayerTensor | None:
    split = _split_layer_name(name)
    if split is None:
        return None
    block_index, slot, rest = split
    if not 0 <= block_index < pattern.num_blocks:
        raise CanonicalKeyError(
            f"{name!r}: physical block {block_index} does not exist in pattern "
            f"{str(pattern)!r} ({pattern.num_blocks} blocks)"
        )
    block = pattern.blocks[block_index]
    for kind, slots in PHYSICAL_SLOTS.items():
        for part in _PARTS:
            if slot != getattr(slots, part):
                continue
            sequence = kind == SEQUENCE
            symbol = sequence_symbol(block) if sequence else channel_symbol(block)
            if symbol is None:
                raise CanonicalKeyError(f"{name!r}: block {block!r} has no {kind} mixer")
            _spec(symbol, name)
            layers = pattern.canonical_layers(block_index)
            return LayerTensor(
                layers[0] if sequence else layers[-1], symbol, block_index, part, rest
            )
    raise CanonicalKeyError(f"{name!r}: unknown block slot {slot!r}")


def _spec(symbol: str, name: str) -> MixerSpec:
    spec = SPECS.get(symbol)
    if spec is None:
        raise CanonicalKeyError(
            f"{name!r}: layer symbol {symbol!r} ({SYMBOL_NAMES[symbol]}) is not implemented, so "
            "it has no checkpoint names"
        )
    return spec


def _split_layer_name(name: str) -> tuple[int, str, str] | None:
    """(layer or block index, slot, rest) of a `decoder.layers.{i}.{slot}.{rest}` name; None for
    names outside the decoder layers."""
    parts = name.split(".")
    if tuple(parts[:2]) != _DECODER:
        return None
    if len(parts) < 5:
        raise CanonicalKeyError(f"{name!r} is not a tensor of a decoder layer")
    return _int(parts[2], name), parts[3], ".".join(parts[4:])


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CanonicalKeyError(f"{name!r}: expected a layer index, found {text!r}") from None
