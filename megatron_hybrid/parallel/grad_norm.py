"""Gradient clipping over a model whose parameters mix plain tensors and DTensors on several
meshes (tensor-parallel weights, FSDP shards, replicated norms): one total norm from torch's
per-group norms, each DTensor group reduced by DTensor itself."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def clip_grad_norm(parameters, max_norm: float, pipeline_group=None, copies=()) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; returns that norm (before
    clipping) as a plain tensor on the gradients' device, the same on every rank. Clipping reads
    the norm on the host (one synchronization) to skip the multiply when no scaling is needed.
    With pipeline parallelism each rank holds some stages' parameters: `pipeline_group` (the pp
    process group) sums the squares over the stages. `copies` are clipped with the rest but not
    counted in the norm (a tied embedding's copy on the last stage: its gradient is the first
    stage's, counted there)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    # On the device: without clipping (max_norm inf) nothing here waits for the GPU.
    device = squares[0].device if squares else torch.device("cpu")
    total = torch.stack([s.to(device) for s in squares]).sum() if squares else torch.zeros(())
    if pipeline_group is not None:
        collective = "cuda" if dist.get_backend(pipeline_group) == "nccl" else "cpu"
        total = total.to(collective)
        dist.all_reduce(total, group=pipeline_group)
    total = total.sqrt()
    if math.isfinite(max_norm):
        coef = min(max_norm / (float(total) + 1e-6), 1.0)  # as torch's clip_grad_norm_
        if coef < 1.0:
            for grads in groups.values():  # one kind of tensor per foreach call
                torch._foreach_mul_(grads, coef)
            for copy in copies:
                if copy.grad is not None:
                    copy.grad.mul_(coef)
    return total
