"""The one way tests start several processes: torchrun on this machine (gloo on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "pretrain_hybrid.py"


def torchrun_argv(nproc: int, script: Path, *args: str) -> list[str]:
    """The command line running `script args` on `nproc` local ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
    ]


# One thread each (CI has 2 cores); workers import their test module's neighbours.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CWD = REPO / "tests"


def torchrun(
    nproc: int, script: Path, *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `script args` on `nproc` local ranks; with `check`, assert it exited 0 and show the
    end of its output otherwise."""
    proc = subprocess.run(
        torchrun_argv(nproc, script, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=CWD,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
