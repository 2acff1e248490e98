"""Data parallelism with FSDP2 (`fully_shard`): one unit per physical block, then the root.

Under expert parallelism the experts of every MoE layer are a unit of their own, nested in their
block's: their weights are already split over mesh["ep"], so FSDP shards them over mesh["edp"]
(the data-parallel ranks holding the same experts) while the rest of the block is sharded over
mesh["dp_shard"] = edp x ep, as torchtitan does."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import SAC_IGNORED_OPS

from megatron_hybrid.layers.moe import GroupedExperts
from megatron_hybrid.model import HybridModel


def apply_fsdp(model: HybridModel, mesh: DeviceMesh, bf16: bool, log=print) -> None:
    """Shard every parameter over the data-parallel ranks of `mesh` (the trainer's whole
    ("pp", "edp", "ep", "tp") mesh), each physical block as one unit (a fused block gathers and
    frees its two sub-layers together), experts under expert parallelism as a nested unit over
    "edp". With `bf16`, compute runs on bf16 copies of the parameters and gradients are reduced
    in float32."""
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    dp_mesh = mesh["dp_shard"]
    expert_parallel = mesh["ep"].size() > 1
    nccl = dist.get_backend(dp_mesh.get_group()) == "nccl"
    blocks = [block for stack in model.block_stacks() for block in stack.layers.values()]
    if expert_parallel:
        _let_selective_checkpointing_ignore_profiler_ops()
    num_expert_units = 0
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the root's backward.
        reshard = index < len(blocks) - 1
        if expert_parallel:
            for experts in [m for m in block.modules() if isinstance(m, GroupedExperts)]:
                fully_shard(
                    experts, mesh=mesh["edp"], mp_policy=policy, reshard_after_forward=reshard
                )
                # An expert's gradient already sums the tokens of every rank in its ep group
                # (the all-to-all's backward): dividing by all data-parallel ranks, not only
                # by edp, makes it the mean over the global batch like every other gradient.
                experts.set_gradient_divide_factor(dp_mesh.size())
                if not nccl and mesh["edp"].size() > 1:
                    # That factor makes FSDP reduce with NCCL's PREMUL_SUM, which other backends
                    # lack: sum, then divide. (Not with one edp rank: there FSDP 2.13 skips the
                    # reduction, divides, and with this setting would divide a second time.)
                    experts.set_force_sum_reduction_for_comms(True)
                num_expert_units += 1
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    experts_note = (
        f", {num_expert_units} expert units over {mesh['edp'].size()} expert-data-parallel ranks"
        if num_expert_units
        else ""
    )
    log(
        f"FSDP2: {len(blocks)} blocks + root sharded over {dp_mesh.size()} data-parallel ranks"
        f"{experts_note}{' (bf16 params, fp32 reduce)' if bf16 else ''}"
    )


def _let_selective_checkpointing_ignore_profiler_ops() -> None:
    """FSDP2 runs its pre/post-forward hooks under `record_function`, whose profiler ops are
    dispatched. An expert unit nested in a block under selective activation checkpointing fires
    those hooks a different number of times when the block is recomputed than in its forward, and
    selective checkpointing, which replays a region's ops by invocation index, then fails
    ("profiler._record_function_enter_new ... not found in storage"). The profiler ops carry no
    tensors, so the replay may skip them (torch's own list of such ops, SAC_IGNORED_OPS)."""
    for name in ("_record_function_enter", "_record_function_enter_new", "_record_function_exit"):
        packet = getattr(torch.ops.profiler, name)
        SAC_IGNORED_OPS.update(getattr(packet, overload) for overload in packet.overloads())
