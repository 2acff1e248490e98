"""Packed tensors under tensor parallelism, and how they stay canonical in checkpoints.

Some weights concatenate several parts along their rows: Mamba2's in_proj packs [z, x, B, C, dt],
its conv1d channels [x, B, C], SwiGLU's linear_fc1 [gate; up]. Tensor parallelism splits *every
part* over the tp ranks, which a plain row split of the canonical layout does not do (rank 0
would get all of z and half of x). So the tensor-parallel plan stores such a tensor *rank-major*:

    canonical   [z0 z1 | x0 x1 | B0 B1 | C0 C1 | dt0 dt1]      (tp = 2; z0 is z's first half)
    rank-major  [z0 x0 B0 C0 dt0 | z1 x1 B1 C1 dt1]

and a plain `Shard(0)` then hands rank r its slice of every part, [z_r, x_r, B_r, C_r, dt_r], in
the canonical order of parts: the layer's forward runs unchanged on local sizes.

Checkpoints never see the rank-major order (shared/DESIGN.md section 5). `to_canonical` presents
a rank-major DTensor to torch.distributed.checkpoint as a `ShardedTensor` of the canonical shape
whose local shards are this rank's rows, cut into runs that are consecutive in the canonical
layout and placed at their canonical offsets; `from_canonical` puts loaded values back. A rank's
rows are one contiguous range of the rank-major layout, found from the DTensor's placements, so
this holds when FSDP shards the tensor-parallel shard further, and for any tp/dp layout on load.

The plan marks each packed tensor on its module (`mark_packed`); the checkpoint hooks find them
by state-dict name (`packed_tensors`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

# Module attribute holding {parameter name: PackedRows} for the packed parameters it owns.
_MARK = "_tp_packed_rows"
# Wrapper modules whose names torch's get_model_state_dict leaves out of parameter names.
_WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


@dataclass(frozen=True)
class PackedRows:
    """Rows that concatenate `parts` (their row counts, in canonical order), each split evenly
    over `tp` ranks."""

    parts: tuple[int, ...]
    tp: int

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
        return canonical.index_select(0, self.canonical_rows().to(canonical.device))

    def to_canonical_layout(self, rank_major: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rank_major)
        out[self.canonical_rows().to(rank_major.device)] = rank_major
        return out

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
            parts = [p for p in f"{module_name}.{name}".split(".") if p and p not in
                     _WRAPPER_NAMES]
            out[".".join(parts)] = packed
    return out


# -- checkpoint views ------------------------------------------------------------------------

def _row_ranges(tensor: DTensor) -> dict[tuple[int, ...], tuple[int, int]]:
    """{mesh coordinate: (first row, row count)} of every rank's local tensor in the global
    (rank-major) layout. Placements must shard rows only, so each local tensor is one contiguous
    range of rows (tensor parallel's Shard(0), FSDP's Shard(0) or _StridedShard(0) of it)."""
    for placement in tensor.placements:
        if not (isinstance(placement, Replicate)
                or (isinstance(placement, (Shard, _StridedShard)) and placement.dim == 0)):
            raise ValueError(f"a packed tensor must be sharded on rows only, got placements "
                             f"{tensor.placements}")
    mesh_shape = tuple(tensor.device_mesh.shape)
    ranges = {}
    for coordinate in itertools.product(*map(range, mesh_shape)):
        shape, offset = _compute_local_shape_and_global_offset(
            tensor.shape, mesh_shape, list(coordinate), tensor.placements)
        ranges[coordinate] = (offset[0], shape[0])
    # Contiguity check: the distinct ranges tile the rows exactly.
    tiles = sorted({r for r in ranges.values() if r[1]})
    edges = [0]
    for first, count in tiles:
        assert first == edges[-1], f"local rows of {tensor.placements} are not contiguous"
        edges.append(first + count)
    assert edges[-1] == tensor.shape[0]
    return ranges


def to_canonical(tensor: DTensor, packed: PackedRows) -> ShardedTensor:
    """A ShardedTensor of the canonical layout holding this rank's rows of the rank-major DTensor
    `tensor` (local shards are views of its local tensor)."""
    mesh = tensor.device_mesh
    local = tensor.to_local()
    rest = list(tensor.shape[1:])
    ranges = _row_ranges(tensor)
    me = tuple(mesh.get_coordinate())
    nonempty = [r for r in ranges.values() if r[1]]
    if len(set(nonempty)) < len(nonempty):
        # Only FSDP (sharding) and tensor parallelism touch these tensors; a replicated mesh
        # dim (HSDP) would need one writer per range.
        raise NotImplementedError(f"packed tensor replicated over a mesh dim: "
                                  f"{tensor.placements}")
    shards_metadata, local_shards = [], []
    for coordinate, (first, count) in ranges.items():
        rank = int(mesh.mesh[coordinate])
        # Another rank's device index is unknown here (and unused by DCP): type only.
        device = local.device if coordinate == me else local.device.type
        for offset, canonical, length in packed.runs(first, first + count):
            meta = ShardMetadata([canonical] + [0] * len(rest), [length] + rest,
                                 f"rank:{rank}/{device}")
            shards_metadata.append(meta)
            if coordinate == me:
                local_shards.append(LocalShard(local.narrow(0, offset, length), meta))
    metadata = ShardedTensorMetadata(shards_metadata, tensor.shape,
                                     TensorProperties.create_from_tensor(local))
    return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, metadata)


def from_canonical(sharded: ShardedTensor, like: DTensor, packed: PackedRows) -> DTensor:
    """The rank-major DTensor (mesh and placements of `like`) holding the canonical rows that
    `sharded` (made by `to_canonical(like, packed)`, then filled by a load) carries."""
    first, count = _row_ranges(like)[tuple(like.device_mesh.get_coordinate())]
    local = torch.empty_like(like.to_local())
    by_offset = {shard.metadata.shard_offsets[0]: shard.tensor
                 for shard in sharded.local_shards()}
    for offset, canonical, length in packed.runs(first, first + count):
        local.narrow(0, offset, length).copy_(by_offset[canonical])
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def is_canonical_view(value) -> bool:
    """Whether `value` is a checkpoint view made by `to_canonical`."""
    return isinstance(value, ShardedTensor)
