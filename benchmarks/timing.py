"""The one timer of the benchmarks: how long a call takes (`call_times_ms`, `median_ms`) and how
long a stretch of host work takes (`Stopwatch`).

A call is timed on CUDA between two device events recorded on the current stream around it,
waiting for the end event before the next call, so every call starts on an idle GPU and its time
includes any host (Python, launch) overhead the GPU waits on; on other devices with
`time.perf_counter` around it. The GPU kernel time alone, without the waits, is
benchmarks/profiling.py's `kernel_breakdown`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (nothing to wait for off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def call_times_ms(
    fn: Callable[[], object], *, warmup: int, repeat: int, device: torch.device | str
) -> list[float]:
    """Milliseconds of each of `repeat` calls of `fn`, after `warmup` untimed calls (compilation,
    autotuning, allocator growth)."""
    if repeat < 1 or warmup < 0:
        raise ValueError(
            f"timing needs repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}"
        )
    for _ in range(warmup):
        fn()
    synchronize(device)
    on_cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeat):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - began))
    return times


def median_ms(
    fn: Callable[[], object], *, warmup: int, repeat: int, device: torch.device | str
) -> float:
    """Median milliseconds of `repeat` calls of `fn` after `warmup` untimed ones (the median:
    one slow call, a page fault or a clock change, moves it little)."""
    return statistics.median(call_times_ms(fn, warmup=warmup, repeat=repeat, device=device))


class Stopwatch:
    """Host wall-clock seconds since it was made: for work timed once (building an index) or
    run for a time budget. Synchronize the device first when GPU work must be included."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start
