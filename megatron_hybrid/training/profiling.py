"""Megatron-LM's profiling flags: a torch.profiler Chrome trace per rank (`--profile
--use-pytorch-profiler`) or the capture range of an nsys launch (`--profile` alone), over the
training iterations [--profile-step-start, --profile-step-end) of the selected ranks.

The training loop sees one object, `IterationProfiler`: `before_iteration(i)` ahead of each
iteration (global, 1-based: a resumed run keeps counting where it left off), and a `with` block
around the loop that ends the profile, so a window cut short by the end of training, an
--exit-interval or a stop signal still writes its trace.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

TRACE_DIR_NAME = "torch_profile"


@dataclass
class ProfilingSettings:
    """What to profile and how (the "profiling" flags; Megatron-LM's names and defaults)."""

    profile: bool = False
    """Profile iterations [profile_step_start, profile_step_end): with nsys (cudaProfilerStart
    and Stop bound its capture range) unless `use_pytorch_profiler`."""
    use_pytorch_profiler: bool = False
    """Record the window with torch.profiler: a Chrome trace per rank, rank-<R>.json.gz."""
    profile_step_start: int = 10
    """The first profiled iteration (iterations count from 1)."""
    profile_step_end: int = 12
    """The iteration after the last profiled one."""
    profile_ranks: list[int] = field(default_factory=list)
    """Global ranks to profile; empty: all of them."""
    pytorch_profiler_collect_shapes: bool = False
    """torch.profiler records the input shapes of each op."""
    pytorch_profiler_collect_callstack: bool = False
    """torch.profiler records the Python call stack of each op."""


def add_profiling_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the argparse group "profiling" (defaults from ProfilingSettings)."""
    defaults = ProfilingSettings()
    group = parser.add_argument_group(
        "profiling (Megatron-LM's flags; traces of iterations [start, end))"
    )
    group.add_argument(
        "--profile",
        action="store_true",
        default=defaults.profile,
        help="profile the iterations from --profile-step-start to before --profile-step-end: "
        "alone, open and close an nsys capture range (CUDA; launch under `nsys profile "
        "--capture-range=cudaProfilerApi --capture-range-end=stop`)",
    )
    group.add_argument(
        "--use-pytorch-profiler",
        action="store_true",
        default=defaults.use_pytorch_profiler,
        help=f"with --profile: record with torch.profiler, a Chrome trace rank-<R>.json.gz per "
        f"rank in <--tensorboard-dir>/../{TRACE_DIR_NAME}/, else <--log-dir>/{TRACE_DIR_NAME}/",
    )
    group.add_argument(
        "--profile-step-start",
        type=int,
        default=defaults.profile_step_start,
        help="first profiled iteration (iterations count from 1 over resumes)",
    )
    group.add_argument(
        "--profile-step-end",
        type=int,
        default=defaults.profile_step_end,
        help="profiling stops before this iteration",
    )
    group.add_argument(
        "--profile-ranks",
        type=int,
        nargs="+",
        default=defaults.profile_ranks,
        metavar="RANK",
        help="global ranks to profile (default: all ranks)",
    )
    group.add_argument(
        "--pytorch-profiler-collect-shapes",
        action="store_true",
        default=defaults.pytorch_profiler_collect_shapes,
        help="torch.profiler records each op's input shapes",
    )
    group.add_argument(
        "--pytorch-profiler-collect-callstack",
        action="store_true",
        default=defaults.pytorch_profiler_collect_callstack,
        help="torch.profiler records each op's Python call stack",
    )
    return group


def profiling_flag_problem(
    profiling: ProfilingSettings,
    train_iters: int,
    tensorboard_dir: str | None,
    log_dir: str | None,
) -> str | None:
    """What is wrong with the profiling flags on their own (None: nothing); checked before any
    work, after each flag's range (training/arguments.py's FLAG_RANGES). Without --profile the
    other flags do nothing, as in Megatron-LM."""
    if not profiling.profile:
        return None
    start, end = profiling.profile_step_start, profiling.profile_step_end
    if start > train_iters:
        return (
            f"--profile-step-start {start} is beyond --train-iters {train_iters}: the run never "
            f"reaches it; choose an iteration from 1 to {train_iters}"
        )
    if end <= start:
        return (
            f"--profile-step-end {end} must be greater than --profile-step-start {start} "
            "(the profiled iterations are [start, end))"
        )
    if profiling.use_pytorch_profiler and tensorboard_dir is None and log_dir is None:
        return (
            f"--use-pytorch-profiler writes its traces into <--tensorboard-dir>/../"
            f"{TRACE_DIR_NAME}/ or <--log-dir>/{TRACE_DIR_NAME}/: give --tensorboard-dir or "
            "--log-dir"
        )
    return None


def profiling_placement_problem(
    profiling: ProfilingSettings, world_size: int, device: torch.device
) -> str | None:
    """What keeps the profiling flags from applying to this launch (None: nothing): ranks
    outside the world, or an nsys range off CUDA."""
    if not profiling.profile:
        return None
    outside = sorted({r for r in profiling.profile_ranks if r >= world_size})
    if outside:
        return (
            f"--profile-ranks {' '.join(map(str, outside))}: not a rank of this launch of "
            f"{world_size} process(es); valid ranks are 0 to {world_size - 1}"
        )
    if not profiling.use_pytorch_profiler and device.type != "cuda":
        return (
            "--profile without --use-pytorch-profiler bounds an nsys capture range with "
            f"cudaProfilerStart/Stop, which needs CUDA; this run is on {device.type}: add "
            "--use-pytorch-profiler for a torch.profiler trace"
        )
    return None


def trace_directory(tensorboard_dir: str | None, log_dir: str | None) -> Path:
    """Where --use-pytorch-profiler's traces go: Megatron-LM's <tensorboard-dir>/../torch_profile
    when TensorBoard is on, else <log-dir>/torch_profile."""
    if tensorboard_dir is not None:
        return Path(tensorboard_dir, "..", TRACE_DIR_NAME)
    assert log_dir is not None, "profiling_flag_problem requires one of the two"
    return Path(log_dir, TRACE_DIR_NAME)


class IterationProfiler(contextlib.AbstractContextManager):
    """Profiles the iterations [first, end) of a run that resumes after `resumed_iteration`
    (0: a fresh run), where first is --profile-step-start or, resumed inside the window, the
    next iteration; a no-op on ranks not profiled, without --profile, or past the window."""

    def __init__(
        self,
        profiling: ProfilingSettings,
        trace_dir: Path | None,
        rank: int,
        resumed_iteration: int,
        device: torch.device,
        log: Callable[[str], None],
    ):
        self.first = max(profiling.profile_step_start, resumed_iteration + 1)
        self.end = profiling.profile_step_end
        self.recorder = None
        selected = not profiling.profile_ranks or rank in profiling.profile_ranks
        if not (profiling.profile and selected):
            return
        if self.first >= self.end:
            log(
                f"profiling: iterations [{profiling.profile_step_start}, {self.end}) were run "
                f"before iteration {resumed_iteration}, where this run resumes; nothing profiled"
            )
        elif profiling.use_pytorch_profiler:
            assert trace_dir is not None, "--use-pytorch-profiler needs a trace directory"
            self.recorder = TorchProfilerRecorder(
                profiling, self.first, self.end, resumed_iteration, device, log
            )
            self.recorder.start(trace_dir / f"rank-{rank}.json.gz", rank)
        else:
            self.recorder = NsysRange(self.first, self.end, log)

    def before_iteration(self, iteration: int) -> None:
        """Called ahead of each training iteration (global, 1-based)."""
        if self.recorder is not None:
            self.recorder.before_iteration(iteration)

    def __exit__(self, *exc_info) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None


class TorchProfilerRecorder:
    """torch.profiler over the loop with Megatron-LM's schedule: one warmup iteration before the
    window (when the run has one), then the window recorded; the trace is written as the window
    ends (or the loop does)."""

    def __init__(
        self,
        profiling: ProfilingSettings,
        first: int,
        end: int,
        resumed_iteration: int,
        device: torch.device,
        log: Callable[[str], None],
    ):
        self.first, self.end, self.log = first, end, log
        self.last_recorded = first - 1
        # Megatron-LM's schedule (wait=start-1, warmup=1, active=end-start); the profiler's
        # steps count global iterations (`start` steps through those a resumed run did).
        self.resumed_iteration = resumed_iteration
        schedule = torch.profiler.schedule(wait=first - 1, warmup=1, active=end - first, repeat=1)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self._write,
            record_shapes=profiling.pytorch_profiler_collect_shapes,
            with_stack=profiling.pytorch_profiler_collect_callstack,
        )
        self.path: Path | None = None
        self.rank = 0

    def start(self, path: Path, rank: int) -> None:
        self.path, self.rank = path, rank
        self.profile.start()
        # The iterations before the window wait (the schedule's first `first - 1` steps), so
        # stepping through a resumed run's past records nothing; its trace then names iteration
        # i ProfilerStep#i, as a fresh run's does.
        for _ in range(self.resumed_iteration):
            self.profile.step()

    def before_iteration(self, iteration: int) -> None:
        if iteration < self.end:
            self.last_recorded = max(self.last_recorded, iteration)
        self.profile.step()

    def close(self) -> None:
        self.profile.stop()

    def _write(self, profile: torch.profiler.profile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.path))
        self.log(
            f"profiling: torch.profiler trace of rank {self.rank}, iterations "
            f"{self.first}-{self.last_recorded}, written to {self.path.resolve()}"
        )


class NsysRange:
    """nsys's capture range (`nsys profile --capture-range=cudaProfilerApi`): cudaProfilerStart
    before iteration `first`, cudaProfilerStop before iteration `end` (or at the loop's end)."""

    def __init__(self, first: int, end: int, log: Callable[[str], None]):
        self.first, self.end, self.log = first, end, log
        self.last_captured: int | None = None

    def before_iteration(self, iteration: int) -> None:
        if iteration == self.first:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
        if iteration == self.end:
            self.close()
        elif self.first <= iteration < self.end:
            self.last_captured = iteration

    def close(self) -> None:
        if self.last_captured is None:
            return
        # The window's last kernels finish inside the range, so the capture holds them whole.
        torch.cuda.synchronize()
        torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
        self.log(
            f"profiling: nsys capture range closed after iterations "
            f"{self.first}-{self.last_captured}"
        )
        self.last_captured = None
