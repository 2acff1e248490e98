"""The parallel layout: sizes from the flags, checked against the world, the model and the
pattern, and the DeviceMesh built from them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.parallel.tensor_parallel import tensor_parallel_problems


class ParallelConfigError(ValueError):
    """A parallel layout that does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"{name} size must be at least 1, got "
                                          f"{getattr(self, name)}")
        if self.world_size % (self.tp * self.pp):
            raise ParallelConfigError(
                f"world size {self.world_size} is not divisible by tensor x pipeline parallel "
                f"sizes {self.tp} x {self.pp}; launch a multiple of {self.tp * self.pp} processes")
        if self.dp % self.ep:
            raise ParallelConfigError(
                f"expert parallel size {self.ep} must divide the data-parallel size {self.dp} "
                f"(world {self.world_size} / (tp {self.tp} x pp {self.pp}))")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def check_fits(self, config: ModelConfig) -> None:
        """Raise ParallelConfigError naming every reason the model cannot use this layout."""
        unavailable = [(flag, size) for flag, size in (
            ("--pipeline-model-parallel-size", self.pp),
            ("--expert-model-parallel-size", self.ep)) if size > 1]
        if unavailable:
            flags = ", ".join(f"{flag} {size}" for flag, size in unavailable)
            raise ParallelConfigError(
                f"{flags}: pipeline and expert parallelism are not implemented yet; run with "
                "those sizes 1 (data and tensor parallelism are available)")
        if self.tp > 1:
            problems = tensor_parallel_problems(config, self.tp)
            if problems:
                raise ParallelConfigError(
                    f"--tensor-model-parallel-size {self.tp} does not fit pattern "
                    f"{config.hybrid_layer_pattern!r}: " + "; ".join(problems))

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """A ("dp_shard", "tp") mesh (rank = dp_index * tp + tp_index); None for a single
        process."""
        if self.world_size == 1:
            return None
        return init_device_mesh(device_type, (self.dp, self.tp),
                                mesh_dim_names=("dp_shard", "tp"))
