"""A checkpoint written by older code (tests/fixtures/checkpoint_2026_12, saved on 2026-12-06 by
tests/fixtures/make_checkpoint_fixture.py) still loads, to bitwise the same logits and optimizer
state that the older code computed from it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from make_checkpoint_fixture import FIXTURE, fixture_tokens, load_fixture  # noqa: E402


def test_the_2026_12_checkpoint_loads_to_the_same_logits_and_optimizer_state():
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    model, optimizer = load_fixture(FIXTURE)
    with torch.no_grad():
        assert torch.equal(model(fixture_tokens()), expected["logits"])
    state, want = optimizer.state_dict(), expected["optimizer"]
    assert state["state"].keys() == want["state"].keys() and len(state["state"]) > 0
    for index, slots in want["state"].items():
        for name, value in slots.items():
            assert torch.equal(state["state"][index][name], value), (index, name)
    assert state["param_groups"] == want["param_groups"]
