"""Megatron-LM's profiling flags: a torch.profiler trace of exactly the iterations
[--profile-step-start, --profile-step-end) per selected rank, training unchanged by it, and bad
flags refused before any work."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import launch
import pytest
from test_training import TINY

from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.trainer import run_training

FLAGS = [*TINY, "--train-iters", "5", "--log-interval", "1", "--device", "cpu"]
PROFILE_2_TO_4 = [
    "--profile",
    "--use-pytorch-profiler",
    "--profile-step-start",
    "2",
    "--profile-step-end",
    "4",
]
# One event per optimizer step: torch.optim's profiling hook names it after the optimizer.
OPTIMIZER_STEP = "Optimizer.step#AdamW.step"


def train(*flags: str):
    return run_training(build_parser().parse_args([*FLAGS, *flags]))


def trace_events(path: Path) -> list[dict]:
    """The events of a gzipped Chrome trace (the JSON object format, with "traceEvents")."""
    with gzip.open(path, "rt") as file:
        return json.load(file)["traceEvents"]


def step_markers(events: list[dict]) -> list[str]:
    return sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))


def test_pytorch_profiler_traces_the_window_and_leaves_training_unchanged(tmp_path, capsys):
    plain = train()
    profiled = train(*PROFILE_2_TO_4, "--log-dir", str(tmp_path))
    trace = tmp_path / "torch_profile" / "rank-0.json.gz"
    events = trace_events(trace)
    assert step_markers(events) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert sum(e.get("name") == OPTIMIZER_STEP for e in events) == 2  # iterations 2 and 3 only
    assert any(e.get("name", "").startswith("aten::") for e in events)
    assert profiled.losses == plain.losses  # bitwise: the profiler only observes
    assert f"iterations 2-3, written to {trace.resolve()}" in capsys.readouterr().out


def test_trace_goes_beside_the_tensorboard_dir_as_megatron_puts_it(tmp_path):
    pytest.importorskip("tensorboard")
    train(*PROFILE_2_TO_4, "--tensorboard-dir", str(tmp_path / "tb"))
    assert (tmp_path / "torch_profile" / "rank-0.json.gz").is_file()


def test_a_window_cut_short_by_the_end_of_training_is_still_written(tmp_path):
    window = ["--profile", "--use-pytorch-profiler", "--profile-step-start", "4"]
    train(*window, "--profile-step-end", "12", "--log-dir", str(tmp_path))
    events = trace_events(tmp_path / "torch_profile" / "rank-0.json.gz")
    assert step_markers(events) == ["ProfilerStep#4", "ProfilerStep#5"]


def test_resumed_runs_profile_global_iterations(tmp_path, capsys):
    checkpoints = tmp_path / "ckpt"
    train("--save", str(checkpoints), "--exit-interval", "2")
    window = ["--profile", "--use-pytorch-profiler", "--profile-step-start", "3"]
    train(
        *window, "--profile-step-end", "5", "--load", str(checkpoints), "--log-dir", str(tmp_path)
    )
    events = trace_events(tmp_path / "torch_profile" / "rank-0.json.gz")
    assert step_markers(events) == ["ProfilerStep#3", "ProfilerStep#4"]
    assert sum(e.get("name") == OPTIMIZER_STEP for e in events) == 2
    assert "iterations 3-4, written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--profile-step-start", "0"],
            "--profile-step-start must be a whole number of at least 1",
        ),
        (["--profile-step-start", "6"], "--profile-step-start 6 is beyond --train-iters 5"),
        (
            ["--profile-step-start", "3", "--profile-step-end", "3"],
            "--profile-step-end 3 must be greater than --profile-step-start 3",
        ),
        ([*PROFILE_2_TO_4[1:], "--profile-ranks", "1"], "valid ranks are 0 to 0"),
        (
            [*PROFILE_2_TO_4[1:], "--profile-ranks", "-1"],
            "--profile-ranks must be a finite number of at least 0, got -1",
        ),
        (PROFILE_2_TO_4[2:], "add --use-pytorch-profiler"),  # nsys's range on the CPU
    ],
)
def test_bad_profiling_flags_stop_before_any_work(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train("--profile", *flags, "--log-dir", str(tmp_path))
    assert not any(tmp_path.iterdir())  # no metrics.jsonl: the run never started


def test_pytorch_profiler_needs_a_directory_for_its_traces():
    with pytest.raises(ValueError, match="give --tensorboard-dir or --log-dir"):
        train(*PROFILE_2_TO_4)


def test_profile_ranks_selects_the_ranks_that_write_a_trace(tmp_path):
    window = [*PROFILE_2_TO_4[:-1], "3", "--profile-ranks", "1"]
    proc = launch.torchrun(
        2, launch.TRAIN_SCRIPT, *FLAGS, "--train-iters", "3", *window, "--log-dir", str(tmp_path)
    )
    written = sorted(p.name for p in (tmp_path / "torch_profile").iterdir())
    assert written == ["rank-1.json.gz"]
    assert step_markers(trace_events(tmp_path / "torch_profile" / written[0])) == ["ProfilerStep#2"]
    assert "trace of rank 1, iterations 2-2" in proc.stdout


@pytest.mark.gpu
def test_cuda_runs_trace_the_gpu_kernels_too(tmp_path):
    flags = [*PROFILE_2_TO_4, "--device", "cuda", "--log-dir", str(tmp_path)]
    train(*flags)
    events = trace_events(tmp_path / "torch_profile" / "rank-0.json.gz")
    assert step_markers(events) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("cat") == "kernel" for e in events)


@pytest.mark.gpu
def test_nsys_range_opens_and_closes_around_the_window(tmp_path, capsys):
    # Without an nsys launch cudaProfilerStart/Stop do nothing: the run and its log line remain.
    flags = ["--profile", *PROFILE_2_TO_4[2:], "--device", "cuda", "--log-dir", str(tmp_path)]
    train(*flags)
    assert "nsys capture range closed after iterations 2-3" in capsys.readouterr().out
    assert not (tmp_path / "torch_profile").exists()
