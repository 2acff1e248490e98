"""Packed tensors under tensor parallelism, and how they stay canonical in checkpoints.

Some weights concatenate several parts along their rows: Mamba2's in_proj packs [z, x, B, C, dt],
its conv1d channels [x, B, C], SwiGLU's linear_fc1 [gate; up]. Tensor parallelism splits *every
part* over the tp ranks, which a plain row split of the canonical layout does not do (rank 0
would get all of z and half of x). So the tensor-parallel plan stores such a tensor *rank-major*:

    canonical   [z0 z1 | x0 x1 | B0 B1 | C0 C1 | dt0 dt1]      (tp = 2; z0 is z's first half)
    rank-major  [z0 x0 B0 C0 dt0 | z1 x1 B1 C1 dt1]

and a plain `Shard(0)` then hands rank r its slice of every part, [z_r, x_r, B_r, C_r, dt_r], in
the canonical order of parts: the layer's forward runs unchanged on local sizes.

Checkpoints never see the rank-major order. `to_canonical` presents
a rank-major DTensor to torch.distributed.checkpoint as a `ShardedTensor` of the canonical shape
whose local shards are this rank's rows, cut into runs that are consecutive in the canonical
layout and placed at their canonical offsets; `from_canonical` puts loaded values back. A rank's
local tensor is one box of the rank-major tensor (as DCP assumes of any DTensor), found from the
DTensor's placements for every rank, so this holds when FSDP shards the tensor-parallel shard
further (a rank's rows then start mid-part), and for any tp/dp layout on load.

The packed dimension is the rows (dim 0) of a linear weight; `PackedRows(dim=...)` packs
another, e.g. dim 1 of stacked experts' fc1 [E, 2F, H]. The plan marks each packed tensor on its
module (`mark_packed`); the checkpoint hooks find them by state-dict name (`packed_tensors`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

# Module attribute holding {parameter name: PackedRows} for the packed parameters it owns.
_MARK = "_tp_packed_rows"
# Wrapper modules whose names torch's get_model_state_dict leaves out of parameter names.
_WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


@dataclass(frozen=True)
class PackedRows:
    """Rows (indices along `dim`) that concatenate `parts` (their row counts, in canonical
    order), each split evenly over `tp` ranks."""

    parts: tuple[int, ...]
    tp: int
    dim: int = 0

    def __post_init__(self) -> None:
        uneven = [size for size in self.parts if size % self.tp]
        if uneven:
            raise ValueError(f"packed parts {self.parts} cannot be split over {self.tp} "
                             f"tensor-parallel ranks: {uneven} not divisible by {self.tp}")

    @property
    def rows(self) -> int:
        return sum(self.parts)

    def segments(self) -> list[tuple[int, int, int]]:
        """(rank-major row, canonical row, length) of each rank's slice of each part, in
        rank-major order."""
        starts = list(itertools.accumulate(self.parts, initial=0))[:-1]
        out, position = [], 0
        for rank in range(self.tp):
            for start, size in zip(starts, self.parts, strict=True):
                length = size // self.tp
                out.append((position, start + rank * length, length))
                position += length
        return out

    def canonical_rows(self) -> torch.Tensor:
        """Index i of the rank-major layout holds canonical row `canonical_rows()[i]`."""
        return torch.cat([torch.arange(c, c + n) for _, c, n in self.segments()])

    def to_rank_major(self, canonical: torch.Tensor) -> torch.Tensor:
        return canonical.index_select(self.dim, self.canonical_rows().to(canonical.device))

    def to_canonical_layout(self, rank_major: torch.Tensor) -> torch.Tensor:
        index = self.canonical_rows().to(rank_major.device)
        return torch.empty_like(rank_major).index_copy_(self.dim, index, rank_major)

    def runs(self, first: int, stop: int) -> list[tuple[int, int, int]]:
        """Rows [first, stop) of the rank-major layout as maximal runs that are consecutive in
        the canonical layout: (row - first, canonical row, length)."""
        out: list[list[int]] = []
        for position, canonical, length in self.segments():
            lo, hi = max(position, first), min(position + length, stop)
            if lo >= hi:
                continue
            local, canon = lo - first, canonical + lo - position
            if out and out[-1][0] + out[-1][2] == local and out[-1][1] + out[-1][2] == canon:
                out[-1][2] += hi - lo
            else:
                out.append([local, canon, hi - lo])
        return [tuple(run) for run in out]


# -- marking ---------------------------------------------------------------------------------

def mark_packed(module: nn.Module, name: str, packed: PackedRows) -> None:
    """Record that `module`'s parameter `name` is stored rank-major as `packed` describes."""
    marks = dict(getattr(module, _MARK, {}))
    marks[name] = packed
    setattr(module, _MARK, marks)


def packed_tensors(model: nn.Module) -> dict[str, PackedRows]:
    """{state-dict name (as torch's get_model_state_dict writes it): PackedRows} of every packed
    parameter of `model`."""
    out = {}
    for module_name, module in model.named_modules():
        for name, packed in getattr(module, _MARK, {}).items():
            out[state_dict_name(f"{module_name}.{name}")] = packed
    return out


def state_dict_name(name: str) -> str:
    """A parameter's name as torch's get_model_state_dict writes it: without the names of
    wrapper modules (activation checkpointing, torch.compile, FSDP1)."""
    return ".".join(p for p in name.split(".") if p and p not in _WRAPPER_NAMES)


# -- checkpoint views ------------------------------------------------------------------------

def _local_boxes(tensor: DTensor) -> dict[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """{mesh coordinate: (global offsets, local shape)} of every rank's local tensor, the
    box of the global (rank-major) tensor it holds, as DCP saves a DTensor."""
    if any(p.is_partial() for p in tensor.placements):
        raise ValueError(f"cannot checkpoint a partial sum: placements {tensor.placements}")
    mesh_shape = tuple(tensor.device_mesh.shape)
    boxes = {}
    for coordinate in itertools.product(*map(range, mesh_shape)):
        shape, offsets = _compute_local_shape_and_global_offset(
            tensor.shape, mesh_shape, list(coordinate), tensor.placements)
        boxes[coordinate] = (tuple(offsets), tuple(shape))
    nonempty = {box for box in boxes.values() if math.prod(box[1])}
    if len(nonempty) < sum(1 for box in boxes.values() if math.prod(box[1])):
        # FSDP and tensor parallelism shard these tensors; a mesh dim that replicates one
        # (HSDP) would need one writer per box.
        raise NotImplementedError(f"packed tensor replicated over a mesh dim: "
                                  f"{tensor.placements}")
    assert sum(math.prod(shape) for _, shape in nonempty) == tensor.numel(), \
        f"local tensors of placements {tensor.placements} are not boxes of the global tensor"
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
            meta = ShardMetadata(_at(offsets, dim, canonical), _at(shape, dim, length),
                                 f"rank:{rank}/{device}")
            shards_metadata.append(meta)
            if coordinate == me:
                piece = local.narrow(dim, offset, length)
                local_shards.append(LocalShard(
                    piece if piece.is_contiguous() else piece.contiguous(), meta))
    metadata = ShardedTensorMetadata(shards_metadata, tensor.shape,
                                     TensorProperties.create_from_tensor(local))
    return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, metadata)


def from_canonical(sharded: ShardedTensor, like: DTensor, packed: PackedRows) -> DTensor:
    """The rank-major DTensor (mesh and placements of `like`) holding the canonical values that
    `sharded` (made by `to_canonical(like, packed)`, then filled by a load) carries."""
    dim = packed.dim
    offsets, shape = _local_boxes(like)[tuple(like.device_mesh.get_coordinate())]
    local = torch.empty_like(like.to_local())
    by_offset = {shard.metadata.shard_offsets[dim]: shard.tensor
                 for shard in sharded.local_shards()}
    for offset, canonical, length in packed.runs(offsets[dim], offsets[dim] + shape[dim]):
        local.narrow(dim, offset, length).copy_(by_offset[canonical])
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _at(values: tuple[int, ...], dim: int, value: int) -> list[int]:
    return [value if d == dim else v for d, v in enumerate(values)]


def is_canonical_view(value) -> bool:
    """Whether `value` is a checkpoint view made by `to_canonical`."""
    return isinstance(value, ShardedTensor)
