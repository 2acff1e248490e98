"""Python started in the repository root must import installed packages, never the repository's
own top-level folders of the same name (`kernels/` and `checkpointing/` install as
`megatron_hybrid.kernels` and `megatron_hybrid.checkpointing`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every top-level folder of the repository that Python would take for a regular package.
PACKAGE_FOLDERS = sorted(
    path.parent.name for path in REPO.glob("*/__init__.py") if path.parent.name != "megatron_hybrid"
)


def run_in_repo_root(code: str, site: Path | None = None, no_site_packages: bool = False) -> str:
    """Output of `python -c code` started in the repository root (root first on sys.path),
    with `site` on PYTHONPATH as a stand-in for site-packages."""
    env = {**os.environ, "PYTHONPATH": str(site) if site else ""}
    flags = ["-S"] if no_site_packages else []
    done = subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_repository_has_the_folders_this_test_guards():
    assert PACKAGE_FOLDERS == ["checkpointing", "kernels"]


@pytest.mark.parametrize("name", PACKAGE_FOLDERS)
def test_an_installed_package_of_the_same_name_wins_over_the_repository_folder(tmp_path, name):
    installed = tmp_path / name
    installed.mkdir()
    (installed / "__init__.py").write_text("WHO = 'installed'\n")
    (installed / "sub.py").write_text("WHAT = 'installed submodule'\n")
    out = run_in_repo_root(
        f"import {name}, {name}.sub, sys; "
        f"print({name}.WHO, {name}.sub.WHAT, sys.modules[{name!r}].__file__)",
        site=tmp_path,
    )
    assert out == f"installed installed submodule {installed / '__init__.py'}"


@pytest.mark.parametrize("name", PACKAGE_FOLDERS)
def test_without_an_installed_package_the_folder_is_an_empty_namespace(name):
    # What a folder without __init__.py gives: importers (transformers' availability checks)
    # read "no __file__, no version" as "not installed". -S: no site-packages, so nothing of
    # that name is installed.
    out = run_in_repo_root(
        f"import {name}; print(getattr({name}, '__file__', None), "
        f"list({name}.__path__), hasattr({name}, 'resolve_kernels'))",
        no_site_packages=True,
    )
    assert out == "None [] False"


def test_the_package_api_stays_under_megatron_hybrid():
    out = run_in_repo_root(
        "from megatron_hybrid.kernels import resolve_kernels; "
        "import megatron_hybrid.checkpointing.manager as m; "
        "print(resolve_kernels.__module__, m.__name__)"
    )
    assert out == "megatron_hybrid.kernels.registry megatron_hybrid.checkpointing.manager"


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    out = run_in_repo_root(
        "import transformers.models.nemotron_h.modeling_nemotron_h as m; print(m.__name__)"
    )
    assert out == "transformers.models.nemotron_h.modeling_nemotron_h"
