"""`--help` as the README promises: every flag has a help text and states its default once,
and the program is named as the user typed it."""

from __future__ import annotations

import argparse
import sys

import pytest

from megatron_hybrid.training.arguments import DefaultsOnceFormatter, build_parser
from megatron_hybrid.training.cli import main


def flag_helps() -> dict[str, str]:
    parser = build_parser()
    formatter = DefaultsOnceFormatter(parser.prog)
    return {
        action.option_strings[0]: formatter._get_help_string(action)
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    }


def test_every_flag_explains_itself_and_states_its_default_once():
    helps = flag_helps()
    assert len(helps) > 80
    for flag, text in helps.items():
        said = text.split(" (default: ")[0]
        assert said.strip(), f"{flag} has no help text"
        assert "default" in text.lower() or "megatron compatibility" in text, (flag, text)
        assert text.count("(default:") <= 1, (flag, text)
        assert not ("(default:" in text and "default" in said.lower()), (flag, text)


def test_the_whole_help_renders():
    text = build_parser().format_help()
    assert "(default: none)" in text and "(default: on)" in text
    assert "(default: None)" not in text


@pytest.mark.parametrize("program", ["megatron-hybrid-train", "pretrain_hybrid.py"])
def test_errors_name_the_program_as_typed(monkeypatch, capsys, program):
    monkeypatch.setattr(sys, "argv", [f"/some/bin/{program}", "--hybrid-layer-pattern", "M[-*"])
    assert main() == 2
    assert capsys.readouterr().err.startswith(f"{program}: error:")
