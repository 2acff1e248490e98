"""Data parallelism without sharding (DDP, ZeRO-0) with `replicate`, FSDP2's DDP: every rank
holds every parameter, gradients and optimizer state; one unit per physical block, then the
root, as for FSDP (parallel/fsdp.py); why this tool: parallel/data_parallel.py.

Each unit's gradients are all-reduced as one bucket once its backward is done, while earlier
blocks are still in backward; nothing is gathered in forward. Under expert parallelism the
experts of every MoE layer are a unit of their own, replicated over mesh["edp"] (the ranks
holding the same experts), as FSDP shards them there."""

from __future__ import annotations

from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh

from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.fsdp import (
    expert_modules,
    let_selective_checkpointing_ignore_profiler_ops,
    mixed_precision_policy,
    physical_blocks,
)


def apply_replicate(model: HybridModel, mesh: DeviceMesh, bf16: bool, log=print) -> None:
    """Replicate `model` over the data-parallel ranks of `mesh` (the trainer's whole ("pp",
    "edp", "ep", "tp") mesh): gradients averaged over them after backward. With `bf16`, compute
    runs on bf16 copies of the parameters and gradients are reduced in float32."""
    policy = mixed_precision_policy(bf16)
    dp_mesh = mesh["dp_shard"]
    expert_parallel = mesh["ep"].size() > 1
    blocks = physical_blocks(model)
    if expert_parallel:  # nested expert units fire FSDP2's hooks as under fully_shard
        let_selective_checkpointing_ignore_profiler_ops()
    num_expert_units = 0
    for block in blocks:
        if expert_parallel:
            for experts in expert_modules(block):
                replicate(experts, mesh=mesh["edp"], mp_policy=policy)
                # As under FSDP: an expert's gradient already sums its ep group's tokens, so
                # it is divided by every data-parallel rank. Replicate divides locally by this
                # factor and then sums, which every backend offers (no PREMUL_SUM needed).
                experts.set_gradient_divide_factor(dp_mesh.size())
                num_expert_units += 1
        replicate(block, mesh=dp_mesh, mp_policy=policy)
    replicate(model, mesh=dp_mesh, mp_policy=policy)
    experts_note = (
        f", {num_expert_units} expert units over {mesh['edp'].size()} expert-data-parallel ranks"
        if num_expert_units
        else ""
    )
    log(
        f"DDP (replicate, ZeRO-0): {len(blocks)} blocks + root replicated over "
        f"{dp_mesh.size()} data-parallel ranks, gradients all-reduced per block{experts_note}"
        f"{' (bf16 params, fp32 reduce)' if bf16 else ''}"
    )
