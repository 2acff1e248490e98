"""How the data-parallel ranks share the model: Megatron-LM's sharding strategies mapped onto
PyTorch's FSDP2 machinery, and what a micro-batch of gradient accumulation tells them.

    --data-parallel-sharding-strategy   PyTorch tool                          ZeRO stage
    no_shard                            replicate (FSDP2's DDP): all-reduce   0
    optim, optim_grads                  fully_shard, reshard_after_forward    2
      (or --use-distributed-optimizer)    =False
    optim_grads_params (the default)    fully_shard, resharding after         3
                                          forward

`replicate` (torch.distributed._composable.replicate_with_fsdp) is DDP built on FSDP2's
machinery rather than DistributedDataParallel's module wrapper: parameters become DTensors
replicated over the data-parallel mesh, so tensor- and expert-parallel DTensors, DCP
checkpoints, gradient clipping over meshes, `set_requires_gradient_sync` and torch's pipeline
stages treat it exactly as they treat `fully_shard`; each block's gradients are all-reduced as
one bucket as soon as its backward ends, overlapping the blocks still in backward.

Megatron's "optim" (ZeRO-1: all-reduced gradients, sharded optimizer state) has no separate
PyTorch tool; FSDP2 without resharding after forward is ZeRO-2: the parameters are all-gathered
once per step and the gradients reduce-scattered, the same bytes as one all-reduce (an
all-reduce is a reduce-scatter plus an all-gather), with sharded gradients and optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed.device_mesh import DeviceMesh

from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.fsdp import apply_fsdp
from megatron_hybrid.parallel.replicate import apply_replicate

SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
DEFAULT_SHARDING_STRATEGY = "optim_grads_params"  # Megatron-LM's default, and full sharding
# Strategies whose parameters stay gathered from the forward to the end of the step (ZeRO-2).
_GATHERED_ONCE_PER_STEP = ("optim", "optim_grads")


def resolve_sharding_strategy(strategy: str | None, use_distributed_optimizer: bool) -> str:
    """The strategy that runs: the flag's when given; else "optim" (ZeRO-1, run as ZeRO-2)
    with --use-distributed-optimizer, as Megatron-LM's distributed optimizer; else the
    default, full sharding."""
    if strategy is not None:
        return strategy
    return "optim" if use_distributed_optimizer else DEFAULT_SHARDING_STRATEGY


def sharding_strategy_problem(strategy: str | None, use_distributed_optimizer: bool) -> str | None:
    """Why these flags do not fit together, or None."""
    if strategy is not None and strategy not in SHARDING_STRATEGIES:
        return (
            f"--data-parallel-sharding-strategy {strategy!r} is not one of "
            f"{', '.join(SHARDING_STRATEGIES)}"
        )
    if strategy == "no_shard" and use_distributed_optimizer:
        return (
            "--data-parallel-sharding-strategy no_shard keeps the whole optimizer state on every "
            "data-parallel rank, --use-distributed-optimizer shards it: drop one of them (or use "
            "--data-parallel-sharding-strategy optim, optim_grads or optim_grads_params, which "
            "all shard the optimizer state)"
        )
    return None


def apply_data_parallel(
    model: HybridModel,
    mesh: DeviceMesh,
    strategy: str,
    bf16: bool,
    log: Callable[[str], None] = print,
) -> None:
    """Spread `model` over the data-parallel ranks of `mesh` as `strategy` says (one of
    SHARDING_STRATEGIES; ValueError otherwise)."""
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(sharding_strategy_problem(strategy, False))
    if strategy == "no_shard":
        apply_replicate(model, mesh, bf16=bf16, log=log)
    else:
        zero2 = strategy in _GATHERED_ONCE_PER_STEP
        apply_fsdp(model, mesh, bf16=bf16, reshard_after_forward=not zero2, log=log)


def prepare_micro_batch(model: HybridModel, strategy: str, last: bool) -> None:
    """Before the forward of one of a step's micro-batches on a data-parallel `model`:
    gradients are reduced only after the last one (before, each rank accumulates its own);
    under ZeRO-2 the parameters also stay gathered until then, so they are all-gathered once
    per step rather than once per micro-batch."""
    model.set_requires_gradient_sync(last)
    if strategy in _GATHERED_ONCE_PER_STEP:
        model.set_reshard_after_backward(last)
