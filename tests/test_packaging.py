"""Packaging: the wheel (what a non-editable `pip install .` installs) holds every module of the
source, and CI lints with a ruff that its own install step brings."""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    "megatron_hybrid": "megatron_hybrid",
    "kernels": "megatron_hybrid/kernels",
    "checkpointing": "megatron_hybrid/checkpointing",
}


def test_wheel_contains_every_source_module(tmp_path):
    # Build from a clean copy: a stale build/ folder in the checkout would hide a missing package.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ROOTS:
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("megatron_hybrid-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{installed}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, installed in ROOTS.items()
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected - names == set()


def _setup_arguments(monkeypatch) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (nothing is built)."""
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(REPO / "setup.py"))
    return captured


def _ci_commands() -> list[str]:
    """The command lines of .ci/run, comments and blank lines left out."""
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_ci_lints_with_the_ruff_that_the_test_extra_installs_before_the_tests(monkeypatch):
    # CI runs on a fresh machine: the linter must come from the install step, not the machine.
    test_extra = _setup_arguments(monkeypatch)["extras_require"]["test"]
    assert any(re.match(r"ruff\b", requirement) for requirement in test_extra), test_extra
    commands = _ci_commands()
    install = next(i for i, c in enumerate(commands) if 'install -q -e ".[test]"' in c)
    lint = next(i for i, c in enumerate(commands) if re.search(r"\bruff check\b", c))
    tests = next(i for i, c in enumerate(commands) if c.endswith("-m pytest -q"))
    assert install < lint < tests, commands
    assert "set -euo pipefail" in commands  # a lint failure stops CI before the tests
