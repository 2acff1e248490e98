"""Data parallelism with FSDP2 (`fully_shard`): one unit per physical block, then the root."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_hybrid.model import HybridModel


def apply_fsdp(model: HybridModel, mesh: DeviceMesh, bf16: bool, log=print) -> None:
    """Shard every parameter over the mesh's ranks, each physical block as one unit (a fused
    block gathers and frees its two sub-layers together). With `bf16`, compute runs on bf16
    copies of the parameters and gradients are reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    blocks = list(model.decoder.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again right away by the root's backward.
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    log(f"FSDP2: {len(blocks)} blocks + root sharded over {mesh.size()} data-parallel ranks"
        f"{' (bf16 params, fp32 reduce)' if bf16 else ''}")
