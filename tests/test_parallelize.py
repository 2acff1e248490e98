"""`parallelize` applies every parallelism and wrapper in one order, and only those that the
layout and settings ask for; the trainer and the throughput benchmark both go through it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import small_config

from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel import parallelize as parallelize_module
from megatron_hybrid.parallel.dims import ParallelDims
from megatron_hybrid.parallel.parallelize import ParallelSettings, parallelize

REPO = Path(__file__).resolve().parents[1]
STEPS = (
    "apply_tensor_parallel",
    "apply_expert_parallel",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_data_parallel",
)


@pytest.fixture
def applied(monkeypatch) -> list[str]:
    """The apply_* steps parallelize calls, in order (each replaced by a recorder)."""
    calls: list[str] = []
    for name in STEPS:
        monkeypatch.setattr(
            parallelize_module, name, lambda *args, name=name, **kwargs: calls.append(name)
        )
    return calls


class FakeMesh:
    def __getitem__(self, name):
        return name


def test_tensor_expert_checkpointing_compile_then_data_parallel(applied):
    settings = ParallelSettings(
        tensor_model_parallel_size=2, recompute_granularity="full", compile=True
    )
    parallelize(
        HybridModel(small_config("M-")), ParallelDims(4, tp=2), FakeMesh(), settings, bf16=False
    )
    assert applied == list(STEPS)


def test_one_process_without_wrappers_only_offers_expert_parallelism(applied):
    # apply_expert_parallel itself does nothing without a mesh.
    parallelize(
        HybridModel(small_config("M-")), ParallelDims(1), None, ParallelSettings(), bf16=False
    )
    assert applied == ["apply_expert_parallel"]


def test_each_applied_step_logs_one_line():
    lines: list[str] = []
    parallelize(
        HybridModel(small_config("M-*-")),
        ParallelDims(1),
        None,
        ParallelSettings(recompute_granularity="selective", compile=True),
        bf16=False,
        log=lines.append,
    )
    assert len(lines) == 2
    assert lines[0].startswith("activation checkpointing (selective)")
    assert lines[1].startswith("torch.compile")


def test_the_throughput_benchmark_times_the_trainers_step(monkeypatch, capsys):
    """benchmarks/train_throughput.py steps through Trainer.train_step (so through
    parallelize), not a training step of its own."""
    from megatron_hybrid.training import trainer

    steps: list[int] = []
    original = trainer.Trainer.train_step

    def recording(self, iteration, micro_batches):
        steps.append(iteration)
        return original(self, iteration, micro_batches)

    monkeypatch.setattr(trainer.Trainer, "train_step", recording)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import train_throughput

    assert (
        train_throughput.main(
            ["--config", "cpu-smoke", "--steps", "2", "--warmup", "1", "--device", "cpu"]
        )
        == 0
    )
    assert steps == [1, 2, 3]
    assert "cpu-smoke" in capsys.readouterr().out
    sys.modules.pop("train_throughput", None)
