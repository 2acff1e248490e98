"""The one place where physical module names and canonical checkpoint keys meet.

A model's modules are grouped by *physical block* (`decoder.layers.{p}`, one per pattern block,
a fusion group counting once); checkpoints, parameter initialization and every tool speak
*canonical keys*: the model as if no fusion existed, indexed by canonical sub-layer
(the README, section "Checkpoints"):

    decoder.layers.{p}.input_layernorm.*    -> decoder.layers.{s}.norm.*              (M)
    decoder.layers.{p}.self_attention.*     -> decoder.layers.{s}.mixer.*             (M)
    decoder.layers.{p}.input_layernorm.*    -> decoder.layers.{s}.input_layernorm.*   (*)
    decoder.layers.{p}.self_attention.*     -> decoder.layers.{s}.self_attention.*    (*)
    decoder.layers.{p}.pre_mlp_layernorm.*  -> decoder.layers.{c}.pre_mlp_layernorm.* (-, E)
    decoder.layers.{p}.mlp.*                -> decoder.layers.{c}.mlp.*               (-, E)

where s is the canonical index of the block's sequence sub-layer and c of its channel sub-layer
(c = s + 1 in a fused block). Names outside `decoder.layers` are the same in both spaces.
"""

from __future__ import annotations

from megatron_hybrid.pattern import HybridPattern

SEQUENCE_SLOTS = ("input_layernorm", "self_attention")
CHANNEL_SLOTS = ("pre_mlp_layernorm", "mlp")
# Stand-alone names of a sequence mixer's slots where they differ from the fused layer's.
SEQUENCE_SLOT_RENAMES = {"M": {"input_layernorm": "norm", "self_attention": "mixer"}}
_DECODER = ("decoder", "layers")


class CanonicalKeyError(KeyError):
    """A name that does not belong to the model described by the pattern."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def canonical_key(physical_name: str, pattern: HybridPattern) -> str:
    """Map a parameter/buffer name of the model to its canonical checkpoint key."""
    split = _split_layer_name(physical_name)
    if split is None:
        return physical_name
    block_index, slot, rest = split
    if not 0 <= block_index < pattern.num_blocks:
        raise CanonicalKeyError(
            f"{physical_name!r}: physical block {block_index} does not exist in pattern "
            f"{str(pattern)!r} ({pattern.num_blocks} blocks)"
        )
    block = pattern.blocks[block_index]
    layers = pattern.canonical_layers(block_index)
    if slot in SEQUENCE_SLOTS:
        symbol, layer = block[0], layers[0]
        slot = SEQUENCE_SLOT_RENAMES.get(symbol, {}).get(slot, slot)
    elif slot in CHANNEL_SLOTS:
        symbol, layer = block[-1], layers[-1]
    else:
        raise CanonicalKeyError(f"{physical_name!r}: unknown block slot {slot!r}")
    return ".".join((*_DECODER, str(layer), slot, *rest))


def physical_name(key: str, pattern: HybridPattern) -> str:
    """Inverse of `canonical_key` for the model described by `pattern`."""
    split = _split_layer_name(key)
    if split is None:
        return key
    layer, slot, rest = split
    if not 0 <= layer < pattern.num_layers:
        raise CanonicalKeyError(
            f"{key!r}: canonical layer {layer} does not exist in pattern {str(pattern)!r} "
            f"({pattern.num_layers} layers)"
        )
    block_index = pattern.physical_block(layer)
    block = pattern.blocks[block_index]
    symbol = block[pattern.canonical_layers(block_index).index(layer)]
    renames = {v: k for k, v in SEQUENCE_SLOT_RENAMES.get(symbol, {}).items()}
    slot = renames.get(slot, slot)
    return ".".join((*_DECODER, str(block_index), slot, *rest))


def canonical_layer_symbol(key: str, pattern: HybridPattern) -> str | None:
    """The pattern symbol of the canonical sub-layer a key belongs to (None outside layers)."""
    split = _split_layer_name(key)
    if split is None:
        return None
    layer = split[0]
    block_index = pattern.physical_block(layer)
    return pattern.blocks[block_index][pattern.canonical_layers(block_index).index(layer)]


def _split_layer_name(name: str) -> tuple[int, str, list[str]] | None:
    """(layer or block index, slot, rest) of a `decoder.layers.{i}.{slot}.{rest}` name; None for
    names outside the decoder layers."""
    parts = name.split(".")
    if tuple(parts[:2]) != _DECODER:
        return None
    if len(parts) < 5:
        raise CanonicalKeyError(f"{name!r} is not a tensor of a decoder layer")
    return _int(parts[2], name), parts[3], parts[4:]


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CanonicalKeyError(f"{name!r}: expected a layer index, found {text!r}") from None
