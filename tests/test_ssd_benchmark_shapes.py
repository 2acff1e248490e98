"""benchmarks/ssd.py --shape: a device call can time (and profile, and sweep) only the shapes it
names, and a part that names no shape stops the script before any work, listing the shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ssd  # noqa: E402  (benchmarks/ssd.py)

sys.path.pop(0)


def test_without_shape_every_shape_is_kept():
    assert ssd.selected(ssd.SHAPES, None) == ssd.SHAPES
    assert ssd.selected(ssd.SHAPES, []) == ssd.SHAPES


def test_shape_keeps_the_shapes_whose_name_holds_a_part():
    (longest,) = ssd.selected(ssd.SHAPES, ["L16384"])
    assert (longest.batch, longest.seqlen, longest.nheads) == (1, 16384, 128)
    assert ssd.selected(ssd.SHAPES, ["L1024 ", "c256"]) == [ssd.SHAPES[0], *ssd.SHAPES[2:]]


def test_a_part_naming_no_shape_is_refused_with_the_shapes_there_are(capsys):
    with pytest.raises(ValueError, match="L999.*B4 L1024 H32"):
        ssd.selected(ssd.SHAPES, ["L999"])
    with pytest.raises(SystemExit) as stop:
        ssd.main(["--shape", "L999"])
    assert stop.value.code == 2
    assert "matches none of the shapes" in capsys.readouterr().err
