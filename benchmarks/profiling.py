"""Per-kernel GPU time from a torch.profiler trace: the one profiler sum of the benchmarks
(kernels.py, sweep_kernels.py, ssd.py, train_throughput.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_breakdown(step: Callable[[], None], reps: int, device: torch.device) -> dict[str, float]:
    """{kernel name: microseconds per call of `step`}, largest first: the durations of the
    device events of a torch.profiler trace of `reps` calls (empty without device events, e.g.
    on CPU). Kernels inside CUDA graphs may not be traced."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(reps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals: dict[str, float] = {}
    for event in prof.events():
        # Device-side user annotations (e.g. "Optimizer.step#AdamW.step") span kernels that are
        # counted on their own.
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
