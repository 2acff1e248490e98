"""The whole model in one process, from a model part parallelized for training: what generation
runs on (megatron_hybrid/generation.py decodes one process's plain HybridModel).

A part under tensor, expert or data parallelism holds DTensor shards, packed weights in
rank-major order (megatron_hybrid/parallel/packed.py) and wrapped blocks (activation
checkpointing); its blocks' decoding methods would bypass the wrappers' hooks. `whole_model`
gathers each tensor in full, puts packed rows back in canonical order and loads them into a plain
model built the same way, so it computes exactly what the part computes.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from megatron_hybrid.blocks import HybridBlock
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.packed import packed_tensors, state_dict_name


def is_plain(part: HybridModel) -> bool:
    """Whether `part` runs in one process as built: no block wrapped (of the decoder or an MTP
    depth), no DTensor tensor."""
    blocks_plain = all(
        type(block) is HybridBlock
        for stack in part.block_stacks()
        for block in stack.layers.values()
    )
    return blocks_plain and not any(isinstance(t, DTensor) for t in part.state_dict().values())


def whole_model(part: HybridModel) -> HybridModel:
    """`part` itself when it is plain; otherwise a plain HybridModel of the same config and
    kernels on the same device holding `part`'s full tensors. With DTensor shards every rank
    holding the part must call it together (each full gather is a collective). Pipeline stages
    hold only some blocks: ValueError."""
    if not (part.stage.first and part.stage.last):
        raise ValueError(
            f"whole_model needs the whole model; this pipeline stage holds blocks "
            f"{part.stage.blocks} (save a checkpoint and load it into one process instead)"
        )
    if is_plain(part):
        return part
    packed = packed_tensors(part)
    state = {}
    for name, tensor in part.state_dict().items():
        key = state_dict_name(name)
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        state[key] = packed[key].to_canonical_layout(full) if key in packed else full
    device = next(iter(state.values())).device
    with torch.device("meta"):
        copy = HybridModel(part.config, kernels=part.kernels)
    copy.to_empty(device=device)
    copy.load_state_dict(state, strict=True)
    copy.discard_routing_counts()  # the one non-persistent buffer: zero, not uninitialized
    return copy.train(part.training)
