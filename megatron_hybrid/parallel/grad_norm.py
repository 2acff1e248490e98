"""Gradient clipping over a model whose parameters mix plain tensors and DTensors on several
meshes (tensor-parallel weights, FSDP shards, replicated norms): one total norm from torch's
per-group norms, each DTensor group reduced by DTensor itself."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def gradient_norm(parameters, pipeline_group=None) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, as a plain tensor on their device, the
    same on every rank, computed without waiting for the GPU. With pipeline parallelism each
    rank holds some stages' parameters: `pipeline_group` (the pp process group) sums the squares
    over the stages."""
    return _norm_and_groups(parameters, pipeline_group)[0]


def clip_grad_norm(parameters, max_norm: float, pipeline_group=None, copies=()) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; returns that norm (before
    clipping), as `gradient_norm` does. Clipping reads the norm on the host (one
    synchronization) to skip the multiply when no scaling is needed; `clip_divisor` is the way
    without one. `copies` are clipped with the rest but not counted in the norm (a tied
    embedding's copy on the last stage: its gradient is the first stage's, counted there)."""
    total, groups = _norm_and_groups(parameters, pipeline_group)
    if math.isfinite(max_norm):
        coef = min(max_norm / (float(total) + 1e-6), 1.0)  # as torch's clip_grad_norm_
        if coef < 1.0:
            for grads in groups.values():  # one kind of tensor per foreach call
                torch._foreach_mul_(grads, coef)
            for copy in copies:
                if copy.grad is not None:
                    copy.grad.mul_(coef)
    return total


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide the gradients by to clip them to `max_norm`, on the device: the inverse
    of torch's clip_grad_norm_ coefficient, never below 1. A fused optimizer takes it as its
    `grad_scale` and divides inside its own kernel, so clipping neither synchronizes nor makes
    an extra pass over the gradients."""
    return torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)


def _norm_and_groups(parameters, pipeline_group):
    """(global norm, the gradients grouped by the mesh they live on)."""
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
    device = squares[0].device if squares else torch.device("cpu")
    total = torch.stack([s.to(device) for s in squares]).sum() if squares else torch.zeros(())
    if pipeline_group is not None:
        collective = "cuda" if dist.get_backend(pipeline_group) == "nccl" else "cpu"
        total = total.to(collective)
        dist.all_reduce(total, group=pipeline_group)
    return total.sqrt(), groups
