"""Packed tensors under tensor parallelism: their rank-major storage and the marks that name them.

Some weights concatenate several parts along their rows: Mamba2's in_proj packs [z, x, B, C, dt],
its conv1d channels [x, B, C], SwiGLU's linear_fc1 [gate; up]. Tensor parallelism splits *every
part* over the tp ranks, which a plain row split of the canonical layout does not do (rank 0
would get all of z and half of x). So the tensor-parallel plan stores such a tensor *rank-major*:

    canonical   [z0 z1 | x0 x1 | B0 B1 | C0 C1 | dt0 dt1]      (tp = 2; z0 is z's first half)
    rank-major  [z0 x0 B0 C0 dt0 | z1 x1 B1 C1 dt1]

and a plain `Shard(0)` then hands rank r its slice of every part, [z_r, x_r, B_r, C_r, dt_r], in
the canonical order of parts: the layer's forward runs unchanged on local sizes.

The packed dimension is the rows (dim 0) of a linear weight; `PackedRows(dim=...)` packs
another, e.g. dim 1 of stacked experts' fc1 [E, 2F, H]. The plan marks each packed tensor on its
module (`mark_packed`); `packed_tensors` lists them by state-dict name. Checkpoints never see the
rank-major order: checkpointing/packed_views.py presents each packed tensor in canonical order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

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
            raise ValueError(
                f"packed parts {self.parts} cannot be split over {self.tp} "
                f"tensor-parallel ranks: {uneven} not divisible by {self.tp}"
            )

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
