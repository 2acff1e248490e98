"""The documentation stays inside the repository: users get the repository and nothing else."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".cfg", ".txt"}


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return [REPO / name for name in listed if Path(name).suffix in TEXT_SUFFIXES]


def test_no_file_points_readers_outside_the_repository():
    # shared/ holds the maintainers' design notes; users do not have it.
    outside = re.compile(r"\bshared/\w")
    citing = [
        str(path.relative_to(REPO))
        for path in _tracked_text_files()
        if outside.search(path.read_text(errors="replace"))
    ]
    assert citing == []


def test_readme_links_the_architecture_document():
    assert "(docs/architecture.md)" in (REPO / "README.md").read_text()
    assert (REPO / "docs" / "architecture.md").is_file()
