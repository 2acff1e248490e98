"""The single-process trainer: fused == unfused training, accumulation, logging, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid.training.arguments import build_parser, model_config_from_args
from megatron_hybrid.training.cli import main
from megatron_hybrid.training.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--hidden-size",
    "32",
    "--ffn-hidden-size",
    "48",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--mamba-state-dim",
    "8",
    "--mamba-head-dim",
    "8",
    "--mamba-num-groups",
    "2",
    "--mamba-chunk-size",
    "8",
    "--num-experts",
    "4",
    "--moe-ffn-hidden-size",
    "24",
    "--seq-length",
    "24",
    "--micro-batch-size",
    "4",
    "--lr",
    "1e-2",
    "--min-lr",
    "1e-3",
    "--lr-warmup-iters",
    "2",
    "--eval-iters",
    "0",
    "--generate-tokens",
    "0",
    "--no-progress-bar",
]


def train(*flags: str):
    return run_training(build_parser().parse_args([*TINY, *flags]))


def short_default_run(pattern: str, *flags: str, seq_length: int = 64):
    """The embedded default model and data with `pattern`, shortened to 30 iterations of 4 x
    `seq_length` tokens: asserts the mean loss of the last five iterations is more than one nat
    below the first five's (a model that does not learn stays within noise) and returns the
    result."""
    result = run_training(
        build_parser().parse_args(
            [
                *("--hybrid-layer-pattern", pattern, "--train-iters", "30"),
                *("--micro-batch-size", "4", "--seq-length", str(seq_length)),
                *("--lr-warmup-iters", "5", "--eval-iters", "0", "--generate-tokens", "0"),
                "--no-progress-bar",
                *flags,
            ]
        )
    )
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    return result


def test_fused_and_unfused_patterns_train_to_identical_losses():
    common = ("--train-iters", "20", "--log-interval", "5", "--moe-router-enable-expert-bias")
    fused = train("--hybrid-layer-pattern", "[M-][*E]M-", *common)
    unfused = train("--hybrid-layer-pattern", "M-*EM-", *common)
    assert len(fused.losses) == len(unfused.losses) == 20
    assert fused.losses == unfused.losses  # the same ops on the same operands: bitwise equal
    assert fused.losses[-1] < fused.losses[0]


def test_gradient_accumulation_matches_one_large_micro_batch():
    # Without the MoE aux loss (a nonlinear function of each micro-batch's routing counts) the
    # two runs compute the same mean loss and gradients up to float32 summation order: measured
    # within 9e-8 relative over the 4 steps (about one float32 ulp), so rel 1e-6 leaves 10x.
    common = (
        "--hybrid-layer-pattern",
        "[M-]*E",
        "--train-iters",
        "4",
        "--global-batch-size",
        "8",
        "--moe-aux-loss-coeff",
        "0",
    )
    accumulated = train(*common, "--micro-batch-size", "4")
    single = train(*common, "--micro-batch-size", "8")
    for a, b in zip(accumulated.losses, single.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-6)


def test_metrics_jsonl_has_one_record_per_logged_iteration_and_eval(tmp_path):
    train(
        "--hybrid-layer-pattern",
        "M*-E",
        "--train-iters",
        "6",
        "--log-interval",
        "2",
        "--eval-interval",
        "3",
        "--eval-iters",
        "2",
        "--log-dir",
        str(tmp_path),
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "val_loss" in r]
    assert [r["iteration"] for r in train_records] == [2, 4, 6]
    for r in train_records:
        assert {"iteration", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_sec"] > 0
    assert [r["iteration"] for r in eval_records] == [3, 6]


def test_default_run_loss_falls_on_a_shortened_run(capsys):
    # The default model and data, fewer and smaller steps (the full default run is in the README).
    result = run_training(
        build_parser().parse_args(
            [
                "--train-iters",
                "30",
                "--micro-batch-size",
                "4",
                "--seq-length",
                "128",
                "--lr-warmup-iters",
                "5",
                "--eval-interval",
                "30",
                "--eval-iters",
                "2",
                "--generate-tokens",
                "16",
                "--no-progress-bar",
            ]
        )
    )
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert result.val_losses[30] < math.log(257)  # better than uniform over the bytes
    assert result.sample.startswith("The ") and len(result.sample) > 4
    assert "sample:" in capsys.readouterr().out


# -- bad input stops before training with a clear message ------------------------------------
def run_cli(capsys, *flags):
    code = main(list(flags))
    return code, capsys.readouterr().err


def test_invalid_pattern_stops_with_caret_message(capsys):
    code, err = run_cli(capsys, *TINY, "--hybrid-layer-pattern", "M[-*]")
    assert code == 2
    assert "M[-*]" in err and "^" in err


def test_heads_not_divisible_by_groups_stops_with_message(capsys):
    code, err = run_cli(capsys, *TINY, "--num-query-groups", "3")
    assert code == 2
    assert "num_attention_heads=4 is not divisible by num_query_groups=3" in err


def test_moe_without_experts_stops_with_message(capsys):
    code, err = run_cli(capsys, *TINY, "--num-experts", "0")
    assert code == 2 and "num_moe_experts" in err


def test_global_batch_not_a_multiple_of_micro_batch_stops(capsys):
    code, err = run_cli(capsys, *TINY, "--global-batch-size", "6")
    assert code == 2 and "multiple of --micro-batch-size 4" in err


def test_unknown_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--hidden-sizee", "64"])
    assert info.value.code == 2
    assert "unrecognized arguments: --hidden-sizee" in capsys.readouterr().err


def test_hybrid_override_pattern_is_an_alias():
    args = build_parser().parse_args(["--hybrid-override-pattern", "M*"])
    assert args.hybrid_layer_pattern == "M*"


def test_mamba_dt_clamp_flags_set_the_model_config():
    def limit(*flags):
        return model_config_from_args(build_parser().parse_args([*TINY, *flags]), 64).mamba_dt_limit

    assert limit() == (0.0, math.inf)  # Megatron: no clamp
    assert limit("--mamba-dt-floor", "0.001", "--mamba-dt-ceiling", "0.5") == (0.001, 0.5)
    assert limit("--mamba-dt-ceiling", "inf") == (0.0, math.inf)


def test_mamba_dt_ceiling_below_the_floor_stops_with_message(capsys):
    code, err = run_cli(capsys, *TINY, "--mamba-dt-floor", "0.1", "--mamba-dt-ceiling", "0.01")
    assert code == 2
    assert "mamba_dt_ceiling (--mamba-dt-ceiling) must be above mamba_dt_floor=0.1" in err


def test_script_runs_as_a_program(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "pretrain_hybrid.py"),
            *TINY,
            "--hybrid-layer-pattern",
            "[M-]*E",
            "--train-iters",
            "2",
            "--log-interval",
            "1",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2/2 loss" in proc.stdout
    assert (tmp_path / "metrics.jsonl").exists()


def test_compile_per_block_trains_like_eager():
    # Inductor fuses elementwise ops and reorders float32 sums: a few ulps per step.
    common = ("--hybrid-layer-pattern", "[M-]*-", "--train-iters", "3")
    compiled = train(*common, "--compile")
    eager = train(*common)
    blocks = compiled.model.decoder.layers.values()
    assert all(block._compiled_call_impl is not None for block in blocks)
    for a, b in zip(compiled.losses, eager.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
