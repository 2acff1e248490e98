"""The one way tests start several processes: torchrun on this machine (gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "pretrain_hybrid.py"


def torchrun(
    nproc: int, script: Path, *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `script args` on `nproc` local ranks (one thread each: CI has 2 cores); with
    `check`, assert it exited 0 and show the end of its output otherwise."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO / "tests",  # workers import their test module's neighbours
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
