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


def apply_fsdp(
    model: HybridModel,
    mesh: DeviceMesh,
    bf16: bool,
    reshard_after_forward: bool = True,
    log=print,
) -> None:
    """Shard every parameter over the data-parallel ranks of `mesh` (the trainer's whole
    ("pp", "edp", "ep", "tp") mesh), each physical block as one unit (a fused block gathers and
    frees its two sub-layers together), experts under expert parallelism as a nested unit over
    "edp". With `bf16`, compute runs on bf16 copies of the parameters and gradients are reduced
    in float32. `reshard_after_forward` frees each block's gathered parameters after its forward
    (ZeRO-3); without, they stay gathered until its backward (ZeRO-2: one all-gather per step).
    Each block prefetches the next ones' parameters (`set_block_prefetch`)."""
    policy = mixed_precision_policy(bf16)
    dp_mesh = mesh["dp_shard"]
    expert_parallel = mesh["ep"].size() > 1
    nccl = dist.get_backend(dp_mesh.get_group()) == "nccl"
    blocks = physical_blocks(model)
    if expert_parallel:
        let_selective_checkpointing_ignore_profiler_ops()
    num_expert_units = 0
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the root's backward.
        reshard = reshard_after_forward and index < len(blocks) - 1
        if expert_parallel:
            for experts in expert_modules(block):
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
    for stack in model.block_stacks():
        set_block_prefetch(list(stack.layers.values()))
    experts_note = (
        f", {num_expert_units} expert units over {mesh['edp'].size()} expert-data-parallel ranks"
        if num_expert_units
        else ""
    )
    zero = (
        "ZeRO-3: parameters, gradients and optimizer state sharded"
        if reshard_after_forward
        else "ZeRO-2: gradients and optimizer state sharded, parameters gathered once per step"
    )
    log(
        f"FSDP2: {len(blocks)} blocks + root over {dp_mesh.size()} data-parallel ranks "
        f"({zero}){experts_note}, next {PREFETCH_BLOCKS} blocks prefetched"
        f"{' (bf16 params, fp32 reduce)' if bf16 else ''}"
    )


# Blocks whose parameters each block's forward (backward) asks for ahead: the next ones in
# forward (the previous ones in backward), so their all-gathers overlap its compute. Two, not
# one: a block of the hybrid patterns can be short (a norm and a small MLP) and end before a
# gather of the next, larger block would have, leaving that gather exposed.
PREFETCH_BLOCKS = 2


def set_block_prefetch(blocks: list) -> None:
    """Explicit FSDP2 prefetching between the units `blocks` (in forward order), as torchtitan
    sets it: each block's forward starts the all-gathers of the next PREFETCH_BLOCKS blocks,
    each block's backward those of the previous ones. Left implicit, FSDP2 issues a block's
    all-gather only when the host reaches that block, so a host synchronization (MoE routing
    reads its counts) leaves the gather exposed. Call it per stack: a prefetched unit must be
    one that runs next, and an MTP depth runs after the decoder and only in training."""
    for index, block in enumerate(blocks):
        ahead = blocks[index + 1 : index + 1 + PREFETCH_BLOCKS]
        behind = blocks[max(index - PREFETCH_BLOCKS, 0) : index][::-1]
        if ahead:
            block.set_modules_to_forward_prefetch(ahead)
        if behind:
            block.set_modules_to_backward_prefetch(behind)


def mixed_precision_policy(bf16: bool) -> MixedPrecisionPolicy:
    """bf16 compute copies of the parameters with float32 gradient reduction, or none."""
    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def physical_blocks(model: HybridModel) -> list[torch.nn.Module]:
    """The model's physical blocks (the decoder's, then the MTP depths'), in forward order: the
    data-parallel units."""
    return [block for stack in model.block_stacks() for block in stack.layers.values()]


def expert_modules(block: torch.nn.Module) -> list[GroupedExperts]:
    """The routed experts of `block`'s MoE layers: units of their own under expert
    parallelism."""
    return [m for m in block.modules() if isinstance(m, GroupedExperts)]


def let_selective_checkpointing_ignore_profiler_ops() -> None:
    """FSDP2 runs its pre/post-forward hooks under `record_function`, whose profiler ops are
    dispatched. An expert unit nested in a block under selective activation checkpointing fires
    those hooks a different number of times when the block is recomputed than in its forward, and
    selective checkpointing, which replays a region's ops by invocation index, then fails
    ("profiler._record_function_enter_new ... not found in storage"). The profiler ops carry no
    tensors, so the replay may skip them (torch's own list of such ops, SAC_IGNORED_OPS)."""
    for name in ("_record_function_enter", "_record_function_enter_new", "_record_function_exit"):
        packet = getattr(torch.ops.profiler, name)
        SAC_IGNORED_OPS.update(getattr(packet, overload) for overload in packet.overloads())
