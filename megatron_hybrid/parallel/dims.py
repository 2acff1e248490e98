"""The parallel layout: sizes from the flags, checked against the world, the model and the
pattern, and the DeviceMesh built from them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.parallel.expert_parallel import expert_parallel_problems
from megatron_hybrid.parallel.pipeline import check_pipeline_fits
from megatron_hybrid.parallel.tensor_parallel import tensor_parallel_problems


class ParallelConfigError(ValueError):
    """A parallel layout that does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pipeline_schedule: str | None = None  # None: 1f1b, interleaved-1f1b with virtual stages

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(
                    f"{name} size must be at least 1, got {getattr(self, name)}"
                )
        if self.world_size % (self.tp * self.pp):
            raise ParallelConfigError(
                f"world size {self.world_size} is not divisible by tensor x pipeline parallel "
                f"sizes {self.tp} x {self.pp}; launch a multiple of {self.tp * self.pp} processes"
            )
        if self.dp % self.ep:
            raise ParallelConfigError(
                f"expert parallel size {self.ep} must divide the data-parallel size {self.dp} "
                f"(world {self.world_size} / (tp {self.tp} x pp {self.pp}))"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def check_fits(self, config: ModelConfig) -> None:
        """Raise ParallelConfigError naming every reason the model cannot use this layout."""
        problems = expert_parallel_problems(config, self.ep, self.tp)
        if problems:
            raise ParallelConfigError(
                f"expert/tensor-parallel layout (ep {self.ep}, tp {self.tp}) does not fit the MoE "
                f"layers of pattern {config.hybrid_layer_pattern!r}: " + "; ".join(problems)
            )
        if self.pp > 1:
            problems = check_pipeline_fits(config, self.pp, self.pipeline_schedule)
            if problems:
                raise ParallelConfigError(
                    f"--pipeline-model-parallel-size {self.pp} does not fit: " + "; ".join(problems)
                )
        if self.tp > 1:
            problems = tensor_parallel_problems(config, self.tp)
            if problems:
                raise ParallelConfigError(
                    f"--tensor-model-parallel-size {self.tp} does not fit pattern "
                    f"{config.hybrid_layer_pattern!r}: " + "; ".join(problems)
                )

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The world as a ("pp", "edp", "ep", "tp") mesh, tensor parallel fastest:

            rank = (pp_index * dp + dp_index) * tp + tp_index
            dp_index = edp_index * ep + ep_index

        with "dp_shard" = ("edp", "ep") flattened: the data-parallel ranks, over which non-expert
        parameters are FSDP-sharded and micro-batches differ. Expert parameters are split over
        "ep" (each rank holds num_experts / ep experts) and FSDP-sharded over "edp". Sub-meshes
        are looked up by name (`mesh["tp"]`, `mesh["dp_shard"]`, `mesh["pp"]`). None for a
        single process."""
        if self.world_size == 1:
            return None
        mesh = init_device_mesh(
            device_type,
            (self.pp, self.dp // self.ep, self.ep, self.tp),
            mesh_dim_names=("pp", "edp", "ep", "tp"),
        )
        mesh["edp", "ep"]._flatten("dp_shard")
        return mesh
