"""Checkpoint views of the tensors that tensor parallelism stores rank-major
(megatron_hybrid/parallel/packed.py): checkpoints never see the rank-major order.

`to_canonical` presents a rank-major DTensor to torch.distributed.checkpoint as a `ShardedTensor`
of the canonical shape whose local shards are this rank's rows, cut into runs that are
consecutive in the canonical layout and placed at their canonical offsets; `from_canonical` puts
loaded values back. A rank's local tensor is one box of the rank-major tensor (as DCP assumes of
any DTensor), found from the DTensor's placements for every rank, so this holds when FSDP shards
the tensor-parallel shard further (a rank's rows then start mid-part), and for any tp/dp layout
on load.

`packed_views` is the table the checkpoint hooks (checkpointing/state.py) look packed tensors up
in, by state-dict name. A packed tensor that the state dict does not hold under the name the
table expects is an error (`PackedTensorNotFoundError`): looked up under another name it would
be saved in its rank-major order, or loaded canonical values would land in rank-major storage,
without a word.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from megatron_hybrid.checkpointing.errors import PackedTensorNotFoundError
from megatron_hybrid.parallel.packed import PackedRows, packed_tensors, state_dict_name


def packed_views(model: nn.Module, names: Iterable[str], what: str) -> dict[str, PackedRows]:
    """{state-dict name: PackedRows} of `model`'s packed tensors, each checked to be among
    `names`, the names of the state dict `what` (e.g. "the model state dict") being saved or
    loaded. Raises PackedTensorNotFoundError naming every packed tensor that is not."""
    packed = packed_tensors(model)
    names = set(names)
    missing = sorted(packed.keys() - names)
    if missing:
        raise PackedTensorNotFoundError(what, {name: _similar(name, names) for name in missing})
    return packed


def frozen_names(model: nn.Module) -> set[str]:
    """State-dict names of `model`'s frozen parameters: no optimizer holds them, so an optimizer
    state dict does not name them."""
    return {
        state_dict_name(name) for name, param in model.named_parameters() if not param.requires_grad
    }


def _similar(name: str, names: set[str]) -> list[str]:
    """Names ending in the same module and parameter as `name` (where a wrapper module's name
    made the two differ)."""
    tail = ".".join(name.split(".")[-2:])
    return sorted(n for n in names if n.endswith(tail))


def _local_boxes(tensor: DTensor) -> dict[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """{mesh coordinate: (global offsets, local shape)} of every rank's local tensor, the
    box of the global (rank-major) tensor it holds, as DCP saves a DTensor."""
    if any(p.is_partial() for p in tensor.placements):
        raise ValueError(f"cannot checkpoint a partial sum: placements {tensor.placements}")
    mesh_shape = tuple(tensor.device_mesh.shape)
    boxes = {}
    for coordinate in itertools.product(*map(range, mesh_shape)):
        shape, offsets = _compute_local_shape_and_global_offset(
            tensor.shape, mesh_shape, list(coordinate), tensor.placements
        )
        boxes[coordinate] = (tuple(offsets), tuple(shape))
    nonempty = {box for box in boxes.values() if math.prod(box[1])}
    if len(nonempty) < sum(1 for box in boxes.values() if math.prod(box[1])):
        # FSDP and tensor parallelism shard these tensors; a mesh dim that replicates one
        # (HSDP) would need one writer per box.
        raise NotImplementedError(f"packed tensor replicated over a mesh dim: {tensor.placements}")
    assert sum(math.prod(shape) for _, shape in nonempty) == tensor.numel(), (
        f"local tensors of placements {tensor.placements} are not boxes of the global tensor"
    )
    return boxes


def to_canonical(tensor: DTensor, packed: PackedRows) -> ShardedTensor:
    """A ShardedTensor of the canonical layout holding this rank's part of the rank-major
    DTensor `tensor`: its box, cut along the packed dim into runs at canonical offsets."""
    mesh, dim = tensor.device_mesh, packed.dim
    local = tensor.to_local()
    me = tuple(mesh.get_coordinate())
    shards_metadata, local_shards = [], []
    for coordinate, (offsets, shape) in _local_boxes(tensor).items():
        if not math.prod(shape):
            continue
        rank = int(mesh.mesh[coordinate])
        # Another rank's device index is unknown here (and unused by DCP): type only.
        device = local.device if coordinate == me else local.device.type
        first = offsets[dim]
        for offset, canonical, length in packed.runs(first, first + shape[dim]):
            meta = ShardMetadata(
                _at(offsets, dim, canonical), _at(shape, dim, length), f"rank:{rank}/{device}"
            )
            shards_metadata.append(meta)
            if coordinate == me:
                piece = local.narrow(dim, offset, length)
                local_shards.append(
                    LocalShard(piece if piece.is_contiguous() else piece.contiguous(), meta)
                )
    metadata = ShardedTensorMetadata(
        shards_metadata, tensor.shape, TensorProperties.create_from_tensor(local)
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, metadata)


def from_canonical(sharded: ShardedTensor, like: DTensor, packed: PackedRows) -> DTensor:
    """The rank-major DTensor (mesh and placements of `like`) holding the canonical values that
    `sharded` (made by `to_canonical(like, packed)`, then filled by a load) carries."""
    dim = packed.dim
    offsets, shape = _local_boxes(like)[tuple(like.device_mesh.get_coordinate())]
    local = torch.empty_like(like.to_local())
    by_offset = {
        shard.metadata.shard_offsets[dim]: shard.tensor for shard in sharded.local_shards()
    }
    for offset, canonical, length in packed.runs(offsets[dim], offsets[dim] + shape[dim]):
        local.narrow(dim, offset, length).copy_(by_offset[canonical])
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _at(values: tuple[int, ...], dim: int, value: int) -> list[int]:
    return [value if d == dim else v for d, v in enumerate(values)]


def is_canonical_view(value) -> bool:
    """Whether `value` is a checkpoint view made by `to_canonical`."""
    return isinstance(value, ShardedTensor)


def is_moment(value, packed: PackedRows) -> bool:
    """An optimizer state tensor shaped like its (packed) parameter, e.g. Adam's moments."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() > packed.dim
        and value.shape[packed.dim] == packed.rows
    )


def to_rank_major(value: torch.Tensor, like: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """A loaded canonical value of a packed tensor, in the model's rank-major storage order:
    a canonical view made by `to_canonical` back into a DTensor like `like`, a whole canonical
    tensor reordered."""
    if is_canonical_view(value):
        return from_canonical(value, like, packed)
    return packed.to_rank_major(value)
