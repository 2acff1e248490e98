"""Stopping a run cleanly on a signal (Megatron-LM's `--exit-signal-handler`).

A cluster scheduler sends SIGTERM some time before it kills a job; a user presses Ctrl-C
(SIGINT). Either asks the run to stop at the next iteration boundary: the trainer saves a
checkpoint there and exits with status 0, and the command line says how to resume. A second
Ctrl-C stops at once, without saving.

Ranks of a distributed run may receive the signal at different iterations, so they agree on
where to stop: each iteration every rank posts what it has received to a max all-reduce on the
device, and reads the result one iteration later, when the GPU is long done with it (no host
synchronization per step). All ranks stop at the same iteration.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

# The signals --exit-signal may name (SIGINT is always handled while the handler is on).
EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")


class StopRequests:
    """While entered: the exit signal and SIGINT set a stop request instead of killing the
    process. `poll()` at each iteration boundary says which signal (by name) all ranks agree
    to stop on, or None."""

    def __init__(
        self,
        exit_signal: str = "SIGTERM",
        enabled: bool = True,
        log: Callable[[str], None] = print,
        device: torch.device | None = None,
    ):
        if exit_signal not in EXIT_SIGNALS:
            raise ValueError(
                f"--exit-signal {exit_signal}: choose one of {', '.join(EXIT_SIGNALS)}"
            )
        self.signals = [signal.Signals[exit_signal], signal.SIGINT] if enabled else []
        self.log = log
        self.device = device or torch.device("cpu")
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._posted: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._mine: torch.Tensor | None = None  # this rank's signal number, on the device

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self.received == signal.SIGINT:
            # The second Ctrl-C: the user does not want to wait for the save.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received is None:
            self.received = sig
            again = " (Ctrl-C again to stop without saving)" if sig == signal.SIGINT else ""
            self.log(f"{sig.name} received: stopping after this iteration{again}")

    def poll(self) -> str | None:
        """Call once per iteration boundary on every rank: the name of the signal to stop on
        now (the same on every rank), or None to go on."""
        if not dist.is_initialized():
            return self.received.name if self.received is not None else None
        agreed = None
        if self._posted is not None:
            values, ready = self._posted
            if ready is not None:
                ready.synchronize()
            number = int(values.item())
            agreed = signal.Signals(number).name if number else None
        if self._mine is None:
            self._mine = torch.zeros(1, dtype=torch.int64, device=self.device)
        # Filled on the device (a kernel): a tensor built from a host value would be a copy
        # from pageable memory, which waits for the whole queue every iteration.
        mine = self._mine.fill_(int(self.received) if self.received is not None else 0)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        if mine.is_cuda:
            host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            host.copy_(mine, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self._posted = (host, ready)
        else:
            self._posted = (mine, None)
        return agreed
