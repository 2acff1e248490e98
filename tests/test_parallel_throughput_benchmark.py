"""benchmarks/parallel_throughput.py's model and pass-through flags: with --config, every
launched run trains train_throughput.py's model (the one its one-GPU figures are for) at that
config's sequence length and micro-batch, and flags after `--` reach every run. No GPU here:
the launches are recorded, not run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def recorded_launches(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import parallel_throughput

    commands = []

    def launch(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "not run")

    monkeypatch.setattr(parallel_throughput.subprocess, "run", launch)
    yield parallel_throughput, commands
    sys.modules.pop("parallel_throughput", None)
    sys.modules.pop("train_throughput", None)


def _value(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, (flag, command)
    return command[command.index(flag) + 1]


def test_config_runs_train_throughputs_model_with_the_extra_flags(recorded_launches):
    benchmark, commands = recorded_launches
    from train_throughput import CONFIGS

    bench = CONFIGS["megatron-ci-hybrid"]
    extra = ["--compile", "--compile-mode", "reduce-overhead"]
    benchmark.main(["--config", bench.name, "--layout", "1gpu", "--layout", "dp2", "--", *extra])
    assert len(commands) == 2
    for command in commands:
        assert _value(command, "--hybrid-layer-pattern") == bench.model["hybrid_layer_pattern"]
        assert _value(command, "--hidden-size") == str(bench.model["hidden_size"])
        assert _value(command, "--mamba-num-heads") == str(bench.model["mamba_num_heads"])
        assert "--squared-relu" in command
        assert _value(command, "--seq-length") == str(bench.seq_length)
        assert _value(command, "--micro-batch-size") == str(bench.micro_batch)
        assert all(flag in command for flag in extra)
        assert _value(command, "--compile-mode") == "reduce-overhead"


def test_without_config_the_default_model_runs(recorded_launches):
    benchmark, commands = recorded_launches
    benchmark.main(["--layout", "1gpu"])
    (command,) = commands
    assert _value(command, "--hybrid-layer-pattern") == "M-M-M-M*-M-M-M-M*-M-M-M-M-"
    assert _value(command, "--hidden-size") == "1024"
    assert "--compile" not in command


def test_every_config_flag_is_a_training_script_flag():
    """The flags a config turns into must exist in the training script (an unknown flag is an
    error there, which would surface only on the GPU machine)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from train_throughput import CONFIGS
    finally:
        sys.path.remove(str(BENCHMARKS))
    from megatron_hybrid.training.arguments import build_parser

    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    for bench in CONFIGS.values():
        flags = [f for f in bench.model_flags() if f.startswith("--")]
        assert set(flags) <= known, (bench.name, set(flags) - known)


def test_profile_traces_iterations_after_the_warmup_and_summarizes_them(
    recorded_launches, tmp_path
):
    """--profile: each run traces the iterations right after the warm-up (the training
    script's own profiling flags), leaves them out of the median, and carries
    trace_summary.py's figures of every rank's trace."""
    benchmark, commands = recorded_launches
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.randn(8, 8) @ torch.randn(8, 8)
    trace = tmp_path / "cpu-trace.json"
    prof.export_chrome_trace(str(trace))

    def launch(command, **kwargs):
        commands.append(command)
        log_dir = Path(_value(command, "--log-dir"))
        # Iterations 3 and 4 (the profiled ones) are slow: they must not move the median.
        rates = {1: 1.0, 2: 100.0, 3: 5.0, 4: 5.0, 5: 100.0, 6: 100.0}
        lines = [
            f'{{"iteration": {i}, "loss": 1.0, "tokens_per_sec": {rate}}}'
            for i, rate in rates.items()
        ]
        (log_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (log_dir / "torch_profile").mkdir()
        (log_dir / "torch_profile" / "rank-0.json").write_text(trace.read_text())
        return subprocess.CompletedProcess(command, 0, "", "")

    benchmark.subprocess.run = launch
    out = tmp_path / "out.json"
    code = benchmark.main(
        ["--layout", "1gpu", "--iters", "6", "--warmup", "2", "--profile", "--out", str(out)]
    )
    assert code == 0
    (command,) = commands
    assert "--profile" in command and "--use-pytorch-profiler" in command
    assert (_value(command, "--profile-step-start"), _value(command, "--profile-step-end")) == (
        "3",
        "5",
    )
    (result,) = json.loads(out.read_text())
    assert result["tokens_per_s"] == 100.0 and result["iterations"] == 2
    (summary,) = result["trace"]
    assert summary["label"] == "rank-0" and summary["gpu_events"] == 0  # a CPU trace


def test_without_profile_no_profiling_flag_is_passed(recorded_launches):
    benchmark, commands = recorded_launches
    benchmark.main(["--layout", "1gpu"])
    (command,) = commands
    assert not {"--profile", "--use-pytorch-profiler", "--profile-step-start"} & set(command)
