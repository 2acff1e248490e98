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
(c = s + 1 in a fused block). Each multi-token-prediction depth d holds the MTP pattern's blocks
the same way, numbered from 0 within the depth, under Megatron-Core's prefix:

    mtp.layers.{d}.mtp_model_layer.layers.{p}.sequence_norm.*
                                        -> mtp.layers.{d}.mtp_model_layer.layers.{s}.norm.*  (M)

Names outside these block stacks (`embedding.*`, `decoder.final_norm.*`, `mtp.layers.{d}.enorm.*`,
...) are the same in both spaces.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from megatron_hybrid.blocks import PHYSICAL_SLOTS
from megatron_hybrid.pattern import SYMBOL_NAMES, HybridPattern, channel_symbol, sequence_symbol
from megatron_hybrid.specs import SPECS, MixerSpec
from megatron_hybrid.specs.base import SEQUENCE

_DECODER = ("decoder", "layers")
_MTP = ("mtp", "layers")
_MTP_STACK = ("mtp_model_layer", "layers")
_PARTS = ("norm", "mixer")


class CanonicalKeyError(KeyError):
    """A name that does not belong to the model described by the pattern."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


@dataclass(frozen=True)
class LayerTensor:
    """A tensor of one canonical sub-layer: the sub-layer's index and symbol, the physical
    block holding it, `part` "norm" or "mixer", and `name`, the tensor's name inside that
    part (`weight`, `in_proj.weight`, ...). `stack` is the prefix of the block stack holding
    the sub-layer: "decoder.layers", or "mtp.layers.{d}.mtp_model_layer.layers" in MTP depth
    d (where `layer` and `block` count from 0 within the depth)."""

    layer: int
    symbol: str
    block: int
    part: str
    name: str
    stack: str = ".".join(_DECODER)

    @property
    def spec(self) -> MixerSpec:
        return SPECS[self.symbol]


def canonical_key(physical_name: str, pattern: HybridPattern) -> str:
    """Map a parameter/buffer name of the model to its canonical checkpoint key."""
    tensor = _locate_physical(physical_name, pattern)
    if tensor is None:
        return physical_name
    slot = getattr(tensor.spec.slots, tensor.part)
    return ".".join((tensor.stack, str(tensor.layer), slot, tensor.name))


def physical_name(key: str, pattern: HybridPattern) -> str:
    """Inverse of `canonical_key` for the model described by `pattern`."""
    tensor = locate(key, pattern)
    if tensor is None:
        return key
    slot = getattr(PHYSICAL_SLOTS[tensor.spec.kind], tensor.part)
    return ".".join((tensor.stack, str(tensor.block), slot, tensor.name))


def locate(key: str, pattern: HybridPattern) -> LayerTensor | None:
    """Where the tensor under canonical `key` sits; None for names outside the block stacks
    (the decoder layers and each MTP depth's layers). Raises CanonicalKeyError for a key the
    pattern's model does not have."""
    split = _split_layer_name(key, pattern)
    if split is None:
        return None
    stack, layer, slot, name = split
    if not 0 <= layer < stack.blocks.num_layers:
        raise CanonicalKeyError(
            f"{key!r}: canonical layer {layer} does not exist in {stack.describe(pattern)} "
            f"({stack.blocks.num_layers} layers)"
        )
    block_index = stack.blocks.physical_block(layer)
    block = stack.blocks.blocks[block_index]
    symbol = block[stack.blocks.canonical_layers(block_index).index(layer)]
    slots = _spec(symbol, key).slots
    for part in _PARTS:
        if slot == getattr(slots, part):
            return LayerTensor(layer, symbol, block_index, part, name, stack.prefix)
    raise CanonicalKeyError(
        f"{key!r}: canonical layer {layer} is {symbol!r} ({SYMBOL_NAMES[symbol]}), whose "
        f"slots are {slots.norm!r} and {slots.mixer!r}, not {slot!r}"
    )


def _locate_physical(name: str, pattern: HybridPattern) -> LayerTensor | None:
    split = _split_layer_name(name, pattern)
    if split is None:
        return None
    stack, block_index, slot, rest = split
    if not 0 <= block_index < stack.blocks.num_blocks:
        raise CanonicalKeyError(
            f"{name!r}: physical block {block_index} does not exist in "
            f"{stack.describe(pattern)} ({stack.blocks.num_blocks} blocks)"
        )
    block = stack.blocks.blocks[block_index]
    for kind, slots in PHYSICAL_SLOTS.items():
        for part in _PARTS:
            if slot != getattr(slots, part):
                continue
            sequence = kind == SEQUENCE
            symbol = sequence_symbol(block) if sequence else channel_symbol(block)
            if symbol is None:
                raise CanonicalKeyError(f"{name!r}: block {block!r} has no {kind} mixer")
            _spec(symbol, name)
            layers = stack.blocks.canonical_layers(block_index)
            return LayerTensor(
                layers[0] if sequence else layers[-1],
                symbol,
                block_index,
                part,
                rest,
                stack.prefix,
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


@dataclass(frozen=True)
class _Stack:
    """A stack of physical blocks: its name prefix, and its blocks as a pattern of their own
    (whose index maps, `canonical_layers` and `physical_block`, are the stack's)."""

    prefix: str
    blocks: HybridPattern
    depth: int | None = None  # the MTP depth (from 0); None for the main decoder

    def describe(self, pattern: HybridPattern) -> str:
        where = "pattern" if self.depth is None else f"MTP depth {self.depth} of pattern"
        return f"{where} {str(pattern)!r}"


@functools.lru_cache(maxsize=64)
def _mtp_blocks(blocks: tuple[str, ...]) -> HybridPattern:
    return HybridPattern((blocks,))


def _split_layer_name(name: str, pattern: HybridPattern) -> tuple[_Stack, int, str, str] | None:
    """(stack, layer or block index, slot, rest) of a `{stack}.{i}.{slot}.{rest}` name, the
    stack `decoder.layers` or `mtp.layers.{d}.mtp_model_layer.layers`; None for names outside
    the block stacks."""
    parts = name.split(".")
    if tuple(parts[:2]) == _DECODER:
        stack, start = _Stack(".".join(_DECODER), pattern), 2
    elif tuple(parts[:2]) == _MTP and tuple(parts[3:5]) == _MTP_STACK:
        depth = _int(parts[2], name, "an MTP depth")
        if not 0 <= depth < pattern.mtp_depths:
            raise CanonicalKeyError(
                f"{name!r}: MTP depth {depth} does not exist in pattern {str(pattern)!r} "
                f"({pattern.mtp_depths} MTP depths)"
            )
        stack = _Stack(".".join(parts[:5]), _mtp_blocks(pattern.mtp_blocks), depth)
        start = 5
    else:
        return None
    if len(parts) < start + 3:
        raise CanonicalKeyError(f"{name!r} is not a tensor of a layer")
    return stack, _int(parts[start], name), parts[start + 1], ".".join(parts[start + 2 :])


def mtp_depth_tensor(name: str) -> tuple[int, str] | None:
    """(depth, name inside the depth) of a tensor of an MTP depth outside its block stack,
    e.g. (0, "enorm.weight") for `mtp.layers.0.enorm.weight`; None for other names. (Such
    names are the same in both spaces.)"""
    parts = name.split(".")
    if tuple(parts[:2]) != _MTP or len(parts) < 4 or tuple(parts[3:5]) == _MTP_STACK:
        return None
    return _int(parts[2], name, "an MTP depth"), ".".join(parts[3:])


def _int(text: str, name: str, what: str = "a layer index") -> int:
    try:
        return int(text)
    except ValueError:
        raise CanonicalKeyError(f"{name!r}: expected {what}, found {text!r}") from None
