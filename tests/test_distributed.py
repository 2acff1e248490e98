"""Multi-process training through torchrun (gloo, CPU): data parallel (FSDP2) matches one
process, and checkpoints move between the two layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import launch
import pytest
from test_training import TINY

from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
# Fused groups and all four implemented mixers; expert bias exercises the count all-reduce.
FLAGS = [
    *TINY,
    "--hybrid-layer-pattern",
    "[M-][*E]M*E",
    "--moe-router-enable-expert-bias",
    "--global-batch-size",
    "8",
    "--train-iters",
    "6",
    "--log-interval",
    "1",
    "--device",
    "cpu",
]  # gloo on CPU, also on a GPU machine (tests/test_gpu_distributed.py)


def torchrun(nproc: int, *flags: str, log_dir: Path) -> list[float]:
    launch.torchrun(nproc, launch.TRAIN_SCRIPT, *flags, "--log-dir", str(log_dir))
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def val_losses(log_dir: Path) -> dict[int, float]:
    """iteration -> validation loss, as a torchrun run logged them."""
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["val_loss"] for r in records if "val_loss" in r}


def test_torchrun_with_no_batch_flags_trains(tmp_path):
    # --global-batch-size defaults to micro batch x data-parallel size, as in Megatron-LM.
    at = TINY.index("--micro-batch-size")
    flags = TINY[:at] + TINY[at + 2 :]
    losses = torchrun(
        2, *flags, "--train-iters", "2", "--log-interval", "1", "--device", "cpu", log_dir=tmp_path
    )
    assert len(losses) == 2 and all(loss == loss for loss in losses)


def one_process(*flags: str) -> list[float]:
    return run_training(build_parser().parse_args([*FLAGS, *flags])).losses


def assert_close(a, b, rtol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=rtol)


def test_data_parallel_fsdp2_matches_one_process(tmp_path):
    dp2 = torchrun(2, *FLAGS, log_dir=tmp_path)
    single = one_process()
    assert_close(dp2, single)


def test_data_parallel_gradient_accumulation_matches_one_process(tmp_path):
    # Two micro-batches per rank: gradients sync only after the second (FSDP2 no-sync).
    dp2 = torchrun(2, *FLAGS, "--global-batch-size", "16", "--train-iters", "4", log_dir=tmp_path)
    assert_close(dp2, one_process("--global-batch-size", "16", "--train-iters", "4"))


def test_data_parallel_with_activation_checkpointing_matches_one_process(tmp_path):
    dp2 = torchrun(2, *FLAGS, "--recompute-granularity", "selective", log_dir=tmp_path)
    assert_close(dp2, one_process())


def test_checkpoints_move_between_one_process_and_data_parallel(tmp_path):
    single = one_process()
    # dp2 saves at iteration 3; one process resumes and finishes like the straight run.
    torchrun(
        2, *FLAGS, "--save", str(tmp_path / "a"), "--exit-interval", "3", log_dir=tmp_path / "log_a"
    )
    resumed = one_process("--load", str(tmp_path / "a"))
    assert_close(resumed, single[3:])
    # One process saves at iteration 3; dp2 resumes from it.
    one_process("--save", str(tmp_path / "b"), "--exit-interval", "3")
    dp2 = torchrun(2, *FLAGS, "--load", str(tmp_path / "b"), log_dir=tmp_path / "log_b")
    assert_close(dp2, single[3:])


def test_layout_that_does_not_fit_stops_with_a_message(tmp_path):
    proc = launch.torchrun(
        2, launch.TRAIN_SCRIPT, *FLAGS, "--global-batch-size", "4", timeout=300, check=False
    )
    assert proc.returncode != 0
    assert "must be a multiple of --micro-batch-size x data-parallel size = 4 x 2" in proc.stderr


TP_FLAGS = [*FLAGS, "--hybrid-layer-pattern", "[*-]*-"]


def test_tensor_parallel_attention_and_mlp_match_one_process(tmp_path):
    tp2 = torchrun(2, *TP_FLAGS, "--tensor-model-parallel-size", "2", log_dir=tmp_path)
    single = run_training(build_parser().parse_args(TP_FLAGS)).losses
    assert_close(tp2, single)


def test_tensor_parallel_checkpoint_resumes_in_one_process(tmp_path):
    single = run_training(build_parser().parse_args(TP_FLAGS)).losses
    torchrun(
        2,
        *TP_FLAGS,
        "--tensor-model-parallel-size",
        "2",
        "--save",
        str(tmp_path / "c"),
        "--exit-interval",
        "3",
        log_dir=tmp_path / "log",
    )
    resumed = run_training(
        build_parser().parse_args([*TP_FLAGS, "--load", str(tmp_path / "c")])
    ).losses
    assert_close(resumed, single[3:])


def test_worker_exit_flushes_its_output_and_skips_finalization():
    # How a torchrun worker ends after destroying its process group (see
    # exit_without_finalization): buffered output still arrives, the exit code is kept, and no
    # finalization runs (an atexit handler stands for it).
    code = (
        "import atexit, sys\n"
        "from megatron_hybrid.parallel.distributed import exit_without_finalization\n"
        "atexit.register(print, 'finalized')\n"
        "sys.stdout.write('buffered, no newline')\n"
        "exit_without_finalization(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (3, "buffered, no newline"), proc.stderr
