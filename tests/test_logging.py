"""What a run reports: a line per log interval with throughput per GPU, an ETA that counts only
this process's iterations, metrics.jsonl, TensorBoard event files and W&B (optional extras,
with a clear error when missing)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import sys
import types

import pytest
from test_training import TINY, run_cli, train

from megatron_hybrid.flops import peak_bf16_tflops
from megatron_hybrid.training import progress as progress_module
from megatron_hybrid.training.metric_sinks import SCALAR_NAMES
from megatron_hybrid.training.progress import ProgressReporter
from megatron_hybrid.training.trainer import LogWindow

PATTERN = ["--hybrid-layer-pattern", "M*-"]


def test_tensorboard_event_files_hold_megatron_named_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = [
        "--train-iters",
        "4",
        "--log-interval",
        "1",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
    ]
    result = train(*PATTERN, *flags, "--tensorboard-dir", str(tmp_path))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "lm loss validation"} <= tags
    assert {"lm loss vs samples", "throughput", "lm loss validation ppl"} <= tags
    loss = events.Scalars("lm loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(result.losses, rel=1e-6)  # float32 on disk
    validation = events.Scalars("lm loss validation")
    assert [e.step for e in validation] == [2, 4]
    assert validation[-1].value == pytest.approx(result.val_losses[4], rel=1e-6)
    by_samples = events.Scalars("lm loss vs samples")
    assert [e.step for e in by_samples] == [4, 8, 12, 16]  # global batch 4 (micro 4, one rank)


def test_a_missing_extra_is_named_before_training(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    code, err = run_cli(capsys, *TINY, *PATTERN, "--wandb-project", "p")
    assert code == 2
    assert "--wandb-project needs the `wandb` package" in err
    assert "pip install 'megatron-hybrid[wandb]'" in err
    assert "iteration" not in capsys.readouterr().out  # nothing trained


def test_wandb_gets_the_same_scalars(monkeypatch, tmp_path):
    logged, inits = [], []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: inits.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    result = train(*PATTERN, "--train-iters", "2", "--log-interval", "1", "--wandb-project", "p")
    assert inits[0]["project"] == "p" and inits[0]["config"]["train_iters"] == 2
    steps = [(step, values["lm loss"]) for step, values in logged[:-1] if "lm loss" in values]
    assert steps == [(1, result.losses[0]), (2, result.losses[1])]
    assert logged[-1] == "finished"


def test_every_log_interval_leaves_a_line_on_a_terminal():
    stream = io.StringIO()
    reporter = ProgressReporter(10, None, live=True, stream=stream)
    for iteration in (5, 10):
        reporter.log_iteration(iteration, 2.0, 1e-3, 0.5, 1234.0, {"tflops_per_gpu": 0.5})
    lines = [x for x in stream.getvalue().split("\n") if "loss" in x]
    assert len(lines) == 2 and "5/10" in lines[0] and "10/10" in lines[1]


def test_the_eta_after_a_resume_counts_only_this_process(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    reporter = ProgressReporter(200, None, live=False, stream=stream)
    reporter.begin(100)  # resumed at iteration 100
    now[0] += 20.0  # 10 iterations in 20 s
    reporter.log_iteration(110, 2.0, 1e-3, 0.5, 1000.0)
    assert "eta 03:00" in stream.getvalue()  # 90 iterations left at 2 s each


def test_the_log_line_shows_tokens_tflops_and_mfu_per_gpu():
    window = object.__new__(LogWindow)
    window.flops_per_token, window.num_ranks, window.on_gpu = 6e9, 2, True
    window.peak_tflops = peak_bf16_tflops("NVIDIA H100 80GB HBM3")
    values = window.throughput(100_000.0)  # tokens/s of the whole run
    assert values["tokens_per_sec_per_gpu"] == 50_000.0
    assert values["tflops_per_gpu"] == pytest.approx(6e9 * 50_000 / 1e12)  # 300 TFLOP/s
    assert values["mfu"] == pytest.approx(300 / 989.4)
    stream = io.StringIO()
    ProgressReporter(10, None, live=False, stream=stream).log_iteration(
        1, 2.0, 1e-3, 0.5, 100_000.0, values
    )
    assert "100k tok/s (50k/GPU, 300.0 TFLOP/s/GPU, MFU 30.3%)" in stream.getvalue()


def test_the_peak_table_knows_the_pcie_h100_from_the_sxm_one():
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("some CPU") is None


def test_metrics_records_carry_consumed_samples_and_throughput(tmp_path):
    train(*PATTERN, "--train-iters", "2", "--log-interval", "1", "--log-dir", str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if "loss" in r]
    assert [r["consumed_samples"] for r in iterations] == [4, 8]
    assert all(r["tflops_per_gpu"] > 0 for r in iterations)  # one process on CPU: the run's
    assert set(SCALAR_NAMES) >= {"loss", "val_loss", "tflops_per_gpu"}
