"""No checkpoint is written from non-finite state: the saver checks every rank's parameters,
buffers and optimizer state for NaN and inf first and, on any rank's find, every rank raises.

Since no non-finite checkpoint can be written and `--keep-last` pruning never removes the
checkpoint `latest` names, the newest finite checkpoint survives a run that diverges."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_hybrid.checkpointing.errors import NonFiniteCheckpointError, listing
from megatron_hybrid.checkpointing.parts import as_optimizers, as_parts
from megatron_hybrid.parallel.distributed import all_ranks_agree
from megatron_hybrid.parallel.packed import state_dict_name


def check_finite(model, optimizer, what: str, group=None) -> None:
    """Raise NonFiniteCheckpointError on every rank (naming each rank's non-finite tensors)
    when any rank's `model` parts or `optimizer` state hold NaN or inf. A collective over
    `group` when torch.distributed is initialized: every rank must call it, and all agree."""
    local = non_finite_tensors(model, optimizer)
    if all_ranks_agree(not local, group=group):
        return
    if dist.is_initialized():
        every_rank: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every_rank, local, group=group)
        found = "; ".join(
            f"rank {rank}: {listing(names, limit=6)}"
            for rank, names in enumerate(every_rank)
            if names
        )
    else:
        found = listing(local, limit=6)
    raise NonFiniteCheckpointError(
        f"not saving {what}: tensors hold NaN or inf ({found}); nothing was written and "
        "`latest` did not move. If the training diverged, resume from the last checkpoint with "
        "a lower learning rate or stronger gradient clipping"
    )


def non_finite_tensors(model, optimizer) -> list[str]:
    """Names of this rank's tensors (the local shard of a DTensor) that hold NaN or inf: what
    a checkpoint holds of every model part (parameters, persistent buffers) and the optimizer
    state, named `optimizer state {key} of {parameter}`."""
    named: list[tuple[str, torch.Tensor]] = []
    parts = as_parts(model)
    for part in parts:
        named += [(state_dict_name(name), t) for name, t in part.state_dict(keep_vars=True).items()]
    if optimizer is not None:
        for part, part_optimizer in zip(parts, as_optimizers(optimizer), strict=True):
            names = {param: state_dict_name(name) for name, param in part.named_parameters()}
            for param, state in part_optimizer.state.items():
                named += [
                    (f"optimizer state {key} of {names.get(param, '?')}", value)
                    for key, value in state.items()
                    if isinstance(value, torch.Tensor)
                ]
    return _non_finite(named)


def _non_finite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    floating = [
        (name, t.to_local() if isinstance(t, DTensor) else t)
        for name, t in named
        if t.is_floating_point()
    ]
    if not floating:
        return []
    # A float64 sum is finite exactly when every element is: finite float32 (or narrower)
    # values cannot add up past float64's range, while one NaN or inf makes the sum non-finite.
    # One small reduction per tensor and one transfer to the host, no tensor-sized mask.
    device = floating[0][1].device
    sums = torch.stack([t.detach().sum(dtype=torch.float64).to(device) for _, t in floating])
    finite = torch.isfinite(sums).tolist()
    return [name for (name, _), ok in zip(floating, finite, strict=True) if not ok]
