"""tests/kernel_checks.py's gate for the Triton test modules: a skip only where triton is not
installed or cannot run here; a Triton kernel module that fails to import is a failure naming it
(as a skip it would hide all seven test_triton_* modules at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kernel_checks
import pytest

REPO = Path(__file__).resolve().parents[1]
BROKEN_MODULE = "megatron_hybrid.kernels.rotary.triton"


def test_without_triton_the_triton_tests_are_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # how Python marks a module as unimportable
    with pytest.raises(pytest.skip.Exception, match="need the triton package"):
        kernel_checks.require_triton_kernels()


def test_a_triton_kernel_module_that_fails_to_import_is_a_failure_naming_it(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setitem(sys.modules, BROKEN_MODULE, None)
    with pytest.raises(pytest.fail.Exception, match=r"rotary\.triton \(.*rotary/triton\.py\)"):
        kernel_checks.require_triton_kernels()


def test_a_broken_triton_kernel_module_fails_the_test_run(tmp_path):
    # End to end: pytest reports the module's collection as an error, not as skipped.
    pytest.importorskip("triton")
    (tmp_path / "break_rotary.py").write_text(
        f"import sys\nsys.modules[{BROKEN_MODULE!r}] = None\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "break_rotary",
            "--collect-only",
            "-q",
            "tests/test_triton_norms.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
    assert f"{BROKEN_MODULE} (" in proc.stdout, proc.stdout


def test_every_registered_triton_module_is_among_the_checked_ones():
    # The import gate globs kernels/<op>/triton*.py; every module a Triton implementation is
    # registered from must be among them, or its import error would go unnoticed until bound.
    from megatron_hybrid.kernels.registry import REGISTRY

    checked = kernel_checks.triton_kernel_modules()
    registered = {
        impl.target.split(":")[0]
        for op in REGISTRY.ops
        for impl in REGISTRY.implementations(op).values()
        if impl.name == "triton"
    }
    assert registered - checked.keys() == set()
    # The SSD scan's forward and backward kernels are imported by its launcher, and checked too.
    assert {
        "megatron_hybrid.kernels.ssd.triton_fwd",
        "megatron_hybrid.kernels.ssd.triton_bwd",
    } <= checked.keys()
