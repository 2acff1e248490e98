"""Per-kernel GPU time from a torch.profiler trace: the one profiler sum of the benchmarks
(kernels.py, sweep_kernels.py, ssd.py, train_throughput.py), and the kernel categories their
summaries (train_throughput.py --profile, trace_summary.py) group kernels into."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Kernel-name patterns of each category, first match wins (case-insensitive substrings). NCCL's
# kernels come first so that no compute pattern can claim a collective.
KERNEL_CATEGORIES = (
    ("communication", ("nccl",)),
    ("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("cross-entropy", ("_cross_entropy",)),
    ("ssd", ("chunk_", "state_passing", "bmm_cb")),
    ("conv1d", ("_conv_",)),
    ("norms", ("_norm_",)),
    ("attention", ("flash", "fmha", "attention")),
    ("activations", ("_squared_relu", "_swiglu")),
    ("rotary", ("_rotary",)),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("inductor (fused elementwise)", ("triton_",)),
)
COMMUNICATION = KERNEL_CATEGORIES[0][0]


def kernel_category(kernel: str) -> str:
    """The first category of KERNEL_CATEGORIES whose pattern occurs in `kernel`, else "other"."""
    lower = kernel.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p.lower() in lower for p in patterns):
            return category
    return "other"


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
