"""What the trainer does when an iteration's loss or gradient norm is NaN or infinite.

Megatron-LM's `--check-for-nan-in-loss-and-grad` (on by default) stops the run. Stopping comes
before the optimizer step, so neither the parameters nor any checkpoint ever hold the result;
`--skip-nonfinite-iterations N` instead drops the gradients of up to N such iterations (a loss
spike from one bad batch) and stops at the next one (a run that keeps diverging).

Two ways to the same decisions:

- on the host (`update_allowed`): the loss and gradient norm are read before the optimizer
  step, which waits for the GPU and so leaves it idle while the host launches the step;
- on the device (`device_flag`, `defer`, `settle`), with a fused optimizer: the flag goes to the
  optimizer as its `found_inf`, whose kernel then leaves parameters and state untouched (as
  under `torch.amp.GradScaler`), and the host reads the values an iteration later, once the GPU
  is long done with them. A stop is then raised during the next iteration, still before its
  optimizer step: the parameters hold the last finite update either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_hybrid.parallel.distributed import all_reduce_mean


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing was saved from that state."""


class _Pending(NamedTuple):
    iteration: int
    values: torch.Tensor  # (loss, gradient norm, any rank non-finite) on the host
    ready: torch.cuda.Event | None  # recorded after the copy (None off CUDA)


class NonFiniteCheck:
    def __init__(
        self,
        enabled: bool,
        max_skips: int,
        log: Callable[[str], None],
        advice_on_stop: Callable[[], str] = lambda: "",
    ):
        self.enabled = enabled
        self.max_skips = max_skips
        self.skipped = 0
        self.log = log
        self.advice_on_stop = advice_on_stop
        self._pending: _Pending | None = None

    def update_allowed(self, iteration: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when the optimizer may apply this iteration's gradients; False to skip them.

        Every rank takes the same decision (a flag averaged over all ranks: one rank's loss can
        be NaN where another's is not). Raises TrainingDivergedError to stop."""
        if not self.enabled:
            return True
        values = torch.stack([loss.detach().float().cpu(), grad_norm.detach().float().cpu()])
        flag = (~torch.isfinite(values)).any().to(torch.float32).reshape(1)
        if float(all_reduce_mean(flag)) == 0:  # the mean over ranks is 0 iff no rank saw one
            return True
        return self._judge(iteration, float(values[0]), float(values[1]))

    def device_flag(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> torch.Tensor | None:
        """1.0 where any rank's loss or the gradient norm is not finite, else 0.0: a float32
        scalar on the device, reduced over all ranks without waiting for the GPU; None when
        the check is off."""
        if not self.enabled:
            return None
        flag = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm.detach())).float()
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def defer(
        self,
        iteration: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        flag: torch.Tensor | None,
    ) -> None:
        """Start copying this iteration's values to the host; `settle` judges them."""
        if flag is None:
            return
        values = torch.stack([loss.detach().float(), grad_norm.detach().float(), flag])
        if values.is_cuda:
            host = torch.empty(3, dtype=torch.float32, pin_memory=True)
            host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = values, None
        self._pending = _Pending(iteration, host, ready)

    def settle(self) -> None:
        """Judge the deferred iteration, if any: log its skip, or raise TrainingDivergedError.
        Waits only for that iteration's work, not for what was queued after it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()
        loss, norm, flag = (float(v) for v in pending.values)
        if flag != 0:
            self._judge(pending.iteration, loss, norm)

    def _judge(self, iteration: int, loss: float, norm: float) -> bool:
        """Count a skip (False) or raise: the iteration's values are not finite on some rank."""
        where = " on this rank; not finite on at least one" if dist.is_initialized() else ""
        what = f"iteration {iteration}: loss {_show(loss)}, gradient norm {_show(norm)}{where}"
        if self.skipped < self.max_skips:
            self.skipped += 1
            self.log(
                f"{what}: update skipped ({self.skipped} of "
                f"--skip-nonfinite-iterations {self.max_skips})"
            )
            return False
        allowance = f"after skipping {self.skipped} such iterations " if self.max_skips else ""
        raise TrainingDivergedError(
            f"{what}: stopping {allowance}before the optimizer step; this state was not "
            f"saved. {self.advice_on_stop()}Try a lower --lr, a longer --lr-warmup-iters or a "
            "smaller --clip-grad; --skip-nonfinite-iterations N skips up to N such iterations"
        )


def _show(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)
