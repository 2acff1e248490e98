"""AdamW with Megatron's weight-decay grouping, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW in which only matrices decay: norms, biases, vectors like A_log/D/dt_bias do not
    (Megatron's rule: no decay for parameters with fewer than 2 dimensions). `fused` None: the
    fused kernel on CUDA unless `foreach` is given."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused needs every parameter of one kind; with tensor parallelism (DTensor weights beside
    # plain norms) the caller asks for the per-parameter loop instead.
    if fused is None:
        first = next(model.parameters(), None)  # None: an empty middle pipeline stage
        fused = first is not None and first.is_cuda and foreach is None
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=foreach
    )


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate at a 1-based iteration: linear warmup to `max_lr`, then decay to `min_lr`
    over `decay_iters` iterations in total (warmup included), then constant `min_lr`."""

    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"

    def __post_init__(self) -> None:
        if self.style not in ("constant", "linear", "cosine", "inverse-square-root"):
            raise ValueError(f"unknown lr decay style {self.style!r}")

    def __call__(self, iteration: int) -> float:
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.max_lr * iteration / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if self.style == "inverse-square-root":
            warmup = max(self.warmup_iters, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warmup) / math.sqrt(iteration))
        if iteration >= self.decay_iters:
            return self.min_lr
        span = max(self.decay_iters - self.warmup_iters, 1)
        ratio = (iteration - self.warmup_iters) / span
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + (self.max_lr - self.min_lr) * coeff


# LRSchedule field -> the flag that sets it
LR_SCHEDULE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "warmup_iters": "--lr-warmup-iters",
    "decay_iters": "--lr-decay-iters (default --train-iters)",
    "style": "--lr-decay-style",
}


def lr_schedule_warning(saved: dict, current: dict, source) -> str | None:
    """A warning naming the schedule settings in which a checkpoint from `source` (`saved`, as
    its TrainProgress.lr_schedule) differs from this run's (`current`), or None. The run follows
    its own flags: a changed schedule may be meant (a longer --train-iters moves the end of the
    decay), so it is reported, not refused."""
    changes = [
        f"{name} ({LR_SCHEDULE_FLAGS.get(name, 'no flag')}): checkpoint {value!r}, "
        f"now {current.get(name)!r}"
        for name, value in saved.items()
        if current and current.get(name) != value
    ]
    if not changes:
        return None
    return (
        f"warning: {source} was saved with other learning-rate schedule settings; this run "
        "follows its flags from here on:\n  " + "\n  ".join(changes)
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
