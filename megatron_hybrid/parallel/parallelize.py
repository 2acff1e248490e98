"""`parallelize`: every parallelism and wrapper a model part gets, in one place and one order.

    FP8 -> tensor parallel -> expert parallel -> activation checkpointing -> compile -> data
    parallel (FSDP2 or replicate, parallel/data_parallel.py)

Each step needs the ones before it: FP8 swaps the blocks' linear layers for torchao's float8
ones before anything wraps them (torchao's order: convert, then compile, then FSDP), expert
parallelism shards the MoE layers that tensor parallelism leaves alone (their tp split as well),
checkpointing wraps blocks whose layers are already sharded, compile traces the wrapped blocks,
and data parallelism (FSDP2 sharding or DDP-style replication) takes whatever parameters (plain
or DTensor) the model then has, block by block outside the compiled regions. The trainer and
benchmarks/train_throughput.py call it; each step logs one line when it applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

from megatron_hybrid.kernels.float8 import DEFAULT_FP8_RECIPE
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
from megatron_hybrid.parallel.compile import apply_compile
from megatron_hybrid.parallel.data_parallel import apply_data_parallel, resolve_sharding_strategy
from megatron_hybrid.parallel.dims import ParallelDims
from megatron_hybrid.parallel.expert_parallel import apply_expert_parallel
from megatron_hybrid.parallel.fp8 import apply_fp8, fp8_tensor_parallel_problem
from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelSettings:
    """How the model is split over the ranks of a torchrun launch (data parallel takes the ranks
    the other sizes leave) and what wraps or converts its blocks (the "parallelism" and "FP8"
    flags)."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every Mamba2, attention and MLP layer (and, with `expert_model_parallel_
    size`, the experts' width)."""
    sequence_parallel: bool = False
    """With tensor parallelism: also split the residual stream and norms along the sequence."""
    pipeline_model_parallel_size: int = 1
    """Ranks that hold consecutive pipeline stages (the pattern's '|' segments, or an even
    split of its blocks)."""
    expert_model_parallel_size: int = 1
    """Data-parallel ranks over which each MoE layer's experts are split."""
    pipeline_schedule: str | None = None
    """torch.distributed.pipelining schedule; None: 1f1b, or interleaved-1f1b when a rank holds
    several stages."""
    compile: bool = False
    """torch.compile every physical block."""
    compile_mode: str | None = None
    """torch.compile mode with `compile` (e.g. reduce-overhead: CUDA graphs per block)."""
    recompute_granularity: str | None = None
    """Activation checkpointing per block: "full", "selective", or None (off)."""
    fp8_format: str | None = None
    """FP8 GEMMs in the blocks (parallel/fp8.py): "e4m3" or "hybrid" (e5m2 gradients); None:
    off."""
    fp8_recipe: str = DEFAULT_FP8_RECIPE
    """How FP8 tensors are scaled with `fp8_format`: "tensorwise" or "rowwise" (torchao's)."""
    data_parallel_sharding_strategy: str | None = None
    """What the data-parallel ranks shard: "no_shard" (DDP), "optim" / "optim_grads" (ZeRO-2)
    or "optim_grads_params" (ZeRO-3); None: `sharding_strategy()` decides."""
    use_distributed_optimizer: bool = False
    """Megatron-LM's ZeRO-1 flag: shard the optimizer state; alone, it selects "optim"."""

    def sharding_strategy(self) -> str:
        """The data-parallel sharding strategy that runs (parallel/data_parallel.py)."""
        return resolve_sharding_strategy(
            self.data_parallel_sharding_strategy, self.use_distributed_optimizer
        )

    def dims(self, world_size: int) -> ParallelDims:
        """The layout of these sizes over `world_size` ranks (ParallelConfigError if unfit)."""
        return ParallelDims(
            world_size,
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.expert_model_parallel_size,
            pipeline_schedule=self.pipeline_schedule,
        )


def parallelize(
    part: HybridModel,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    settings: ParallelSettings,
    *,
    bf16: bool,
    log: Callable[[str], None] = print,
) -> None:
    """Apply, in place and in the module docstring's order, what `settings` and the layout ask
    for to `part` (a whole model, or one pipeline stage, which is sharded as a whole model
    would be). `mesh` is `dims.build_mesh(...)` (None for one process); `bf16` makes data
    parallelism compute on bf16 copies of the parameters and reduce gradients in float32."""
    if settings.fp8_format is not None:
        problem = fp8_tensor_parallel_problem(settings.fp8_format, dims.tp)
        if problem is not None:
            raise ValueError(problem)
        apply_fp8(part, settings.fp8_format, settings.fp8_recipe, log=log)
    if dims.tp > 1:
        apply_tensor_parallel(
            part, mesh["tp"], sequence_parallel=settings.sequence_parallel, log=log
        )
    apply_expert_parallel(part, mesh, log=log)
    if settings.recompute_granularity:
        apply_activation_checkpointing(part, settings.recompute_granularity, log=log)
    if settings.compile:
        apply_compile(part, mode=settings.compile_mode, log=log)
    if dims.dp > 1:
        apply_data_parallel(part, mesh, settings.sharding_strategy(), bf16=bf16, log=log)
