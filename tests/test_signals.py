"""SIGTERM (a scheduler's notice) or Ctrl-C stops a run at the next iteration boundary with a
checkpoint and exit status 0, and the resume continues exactly where the uninterrupted run
would have been (Megatron-LM's --exit-signal-handler, on by default here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import launch
import pytest
from test_training import TINY

from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.cli import resume_hint

ITERS = 300  # long enough that the signal always lands mid-run on a fast machine
UNTIL = 40  # resumed and reference runs stop here (--exit-interval): the schedule is ITERS'
FLAGS = [
    *TINY,
    "--hybrid-layer-pattern",
    "M*-",
    "--train-iters",
    str(ITERS),
    "--log-interval",
    "1",
    "--eval-iters",
    "0",
    "--generate-tokens",
    "0",
    "--no-progress-bar",
]


EXIT = ["--exit-interval", str(UNTIL)]


def losses(log_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


def wait_for_iterations(log_dir: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be signalled"
        if (log_dir / "metrics.jsonl").exists() and len(losses(log_dir)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} iterations logged in {log_dir} within 240 s")


def interrupt_and_resume(tmp_path: Path, argv, signal_targets, sig=signal.SIGTERM):
    """Start `argv(flags)`, signal it after 3 logged iterations, check the stop, resume to the
    end; returns (stopped iteration, losses of the stopped run, losses of the resumed run)."""
    save = tmp_path / "ckpt"
    first = tmp_path / "first"
    proc = subprocess.Popen(
        argv([*FLAGS, "--save", str(save), "--log-dir", str(first)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launch.ENV,
        cwd=launch.CWD,
    )
    try:
        wait_for_iterations(first, 3, proc)
        for pid in signal_targets(proc):
            os.kill(pid, sig)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < UNTIL, "the signal came too late to test the resume"
    assert f"stopped by {sig.name} at iteration {stopped}; saved" in out
    assert "resume with:" in out and f"--load {save}" in out
    assert max(losses(first)) == stopped  # the stop iteration is logged, nothing after it
    resumed = tmp_path / "resumed"
    subprocess.run(
        argv([*FLAGS, *EXIT, "--load", str(save), "--save", str(save), "--log-dir", str(resumed)]),
        check=True,
        capture_output=True,
        env=launch.ENV,
        cwd=launch.CWD,
        timeout=600,
    )
    return stopped, losses(first), losses(resumed)


def one_process(flags):
    return [sys.executable, str(launch.TRAIN_SCRIPT), *flags]


def test_sigterm_saves_and_the_resume_matches_the_uninterrupted_run(tmp_path):
    stopped, first, resumed = interrupt_and_resume(tmp_path, one_process, lambda p: [p.pid])
    reference = tmp_path / "reference"
    subprocess.run(
        one_process([*FLAGS, *EXIT, "--log-dir", str(reference)]),
        check=True,
        capture_output=True,
        timeout=600,
    )
    expected = losses(reference)
    assert sorted(resumed) == list(range(stopped + 1, UNTIL + 1))
    assert {i: first[i] for i in range(1, stopped + 1)} == {
        i: expected[i] for i in range(1, stopped + 1)
    }
    assert resumed == {i: expected[i] for i in resumed}  # bitwise: the same run, in two parts


def test_ctrl_c_stops_the_same_way(tmp_path):
    stopped, _, resumed = interrupt_and_resume(
        tmp_path, one_process, lambda p: [p.pid], sig=signal.SIGINT
    )
    assert sorted(resumed) == list(range(stopped + 1, UNTIL + 1))


def _children(proc: subprocess.Popen) -> list[int]:
    """torchrun's worker processes (a scheduler signals every process of the job)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, children
    return [int(pid) for pid in children]


def test_sigterm_to_every_rank_of_a_torchrun_job(tmp_path):
    def two_ranks(flags):
        return launch.torchrun_argv(2, launch.TRAIN_SCRIPT, *flags)

    stopped, first, resumed = interrupt_and_resume(tmp_path, two_ranks, _children)
    reference = tmp_path / "reference"
    launch.torchrun(2, launch.TRAIN_SCRIPT, *FLAGS, *EXIT, "--log-dir", str(reference))
    expected = losses(reference)
    assert sorted(resumed) == list(range(stopped + 1, UNTIL + 1))
    assert first == {i: expected[i] for i in first}
    assert resumed == {i: expected[i] for i in resumed}


@pytest.mark.parametrize(
    "argv, environ, expected",
    [
        (
            ["scripts/pretrain_hybrid.py", "--save", "/r"],
            {},
            "resume with: python scripts/pretrain_hybrid.py --save /r --load /r",
        ),
        (
            ["megatron-hybrid-train", "--save", "/r", "--load", "/r"],
            {},
            "resume with: megatron-hybrid-train --save /r --load /r",
        ),
        (
            ["scripts/pretrain_hybrid.py", "--save", "/r"],
            {"LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"},
            "resume with: torchrun --nproc-per-node=2 scripts/pretrain_hybrid.py --save /r "
            "--load /r",
        ),
        (["megatron-hybrid-train"], {}, "to keep the progress of a stopped run, give it --save"),
    ],
)
def test_the_resume_hint_is_the_typed_command(monkeypatch, argv, environ, expected):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(argv[1:])
    assert resume_hint(args, argv).startswith(expected)
