"""What the trainer does when an iteration's loss or gradient norm is NaN or infinite.

Megatron-LM's `--check-for-nan-in-loss-and-grad` (on by default) stops the run. Stopping comes
before the optimizer step, so neither the parameters nor any checkpoint ever hold the result;
`--skip-nonfinite-iterations N` instead drops the gradients of up to N such iterations (a loss
spike from one bad batch) and stops at the next one (a run that keeps diverging).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_hybrid.parallel.distributed import all_reduce_mean


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN or infinite; nothing was saved from that state."""


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

    def update_allowed(self, iteration: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when the optimizer may apply this iteration's gradients; False to skip them.

        Every rank takes the same decision (a flag averaged over all ranks: one rank's loss can
        be NaN where another's is not). Raises TrainingDivergedError to stop."""
        if not self.enabled:
            return True
        # On the host: clip_grad_norm returns its norm there (it synchronizes anyway).
        values = torch.stack([loss.detach().float().cpu(), grad_norm.detach().float().cpu()])
        flag = (~torch.isfinite(values)).any().to(torch.float32).reshape(1)
        if float(all_reduce_mean(flag)) == 0:  # the mean over ranks is 0 iff no rank saw one
            return True
        loss_value, norm_value = (float(v) for v in values.cpu())
        where = " on this rank; not finite on at least one" if dist.is_initialized() else ""
        what = (
            f"iteration {iteration}: loss {_show(loss_value)}, gradient norm "
            f"{_show(norm_value)}{where}"
        )
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
