"""Every numeric flag is range-checked from one table before any work, with a message naming the
flag, the valid range and the value; settings that do not fit together say what would."""

from __future__ import annotations

import argparse
import math

import pytest
from test_training import TINY, run_cli

from megatron_hybrid.data.tokenizer import TokenizerError, build_tokenizer
from megatron_hybrid.training.arguments import (
    FLAG_RANGES,
    Interval,
    build_parser,
    check_training_args,
    resolve_global_batch_size,
)


def numeric_flags(parser: argparse.ArgumentParser) -> set[str]:
    """dests of the flags whose values are numbers (int, float or a numeric type function)."""
    found = set()
    for action in parser._actions:
        if action.type in (int, float) or (
            action.type is not None
            and action.default is not None
            and isinstance(action.default, (int, float))
            and not isinstance(action.default, bool)
        ):
            found.add(action.dest)
    return found


def test_every_numeric_flag_has_a_range_and_every_range_a_flag():
    parser = build_parser()
    dests = {action.dest for action in parser._actions}
    assert numeric_flags(parser) - FLAG_RANGES.keys() == set()
    assert FLAG_RANGES.keys() - dests == set()


def test_the_defaults_are_inside_their_ranges():
    check_training_args(build_parser().parse_args([]))


@pytest.mark.parametrize(
    "text,inside,outside",
    [
        ("(0, inf)", [1e-30, 5.0], [0.0, -1.0, math.inf, math.nan]),
        ("[0, inf)", [0.0, 3.0], [-1e-9, math.inf, math.nan]),
        ("[0, 1)", [0.0, 0.999], [1.0, -0.1, math.nan]),
        ("[1, inf)", [1, 7], [0, -3]),
        ("[0, inf]", [0.0, math.inf], [-1.0, math.nan]),
    ],
)
def test_interval_notation(text, inside, outside):
    interval = Interval.parse(text)
    assert all(value in interval for value in inside)
    assert not any(value in interval for value in outside)


# The values the issue found accepted (NaN losses with exit 0, or silently ignored).
@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--lr", "inf", "--lr must be a positive finite number, got inf"),
        ("--min-lr", "nan", "--min-lr must be a finite number of at least 0, got nan"),
        ("--norm-epsilon", "nan", "--norm-epsilon must be a positive finite number, got nan"),
        ("--rotary-base", "0", "--rotary-base must be a positive finite number, got 0.0"),
        ("--rotary-base", "-1", "--rotary-base must be a positive finite number, got -1.0"),
        ("--init-method-std", "nan", "--init-method-std must be a positive finite number, got nan"),
        ("--lr-decay-iters", "0", "--lr-decay-iters must be a whole number of at least 1, got 0"),
        ("--lr-decay-iters", "-3", "--lr-decay-iters must be a whole number of at least 1, got -3"),
        ("--weight-decay", "-1", "--weight-decay must be a finite number of at least 0, got -1.0"),
        ("--clip-grad", "-1", "--clip-grad must be a finite number of at least 0, got -1.0"),
        (
            "--moe-router-bias-update-rate",
            "-1",
            "--moe-router-bias-update-rate must be a finite number of at least 0, got -1.0",
        ),
        (
            "--moe-router-topk-scaling-factor",
            "-2",
            "--moe-router-topk-scaling-factor must be a positive finite number, got -2.0",
        ),
        ("--adam-beta2", "1", "--adam-beta2 must be a number in [0, 1), got 1.0"),
        ("--eval-iters", "-1", "--eval-iters must be a finite number of at least 0, got -1"),
    ],
)
def test_out_of_range_flags_stop_before_training(capsys, flag, value, message):
    code, err = run_cli(capsys, *TINY, flag, value)
    assert code == 2
    assert f"error: {message}" in err


def test_vocab_size_with_the_byte_tokenizer_is_refused():
    with pytest.raises(
        TokenizerError,
        match="--vocab-size belongs to --tokenizer-type "
        "NullTokenizer; --tokenizer-type ByteTokenizer "
        "would ignore it",
    ):
        build_tokenizer(build_parser().parse_args(["--vocab-size", "300"]))
    null = build_parser().parse_args(["--vocab-size", "300", "--tokenizer-type", "NullTokenizer"])
    assert build_tokenizer(null).vocab_size == 301


def test_global_batch_size_defaults_to_micro_batch_times_data_parallel_size():
    args = build_parser().parse_args(["--micro-batch-size", "4"])
    assert resolve_global_batch_size(args, dp_size=2) == 1
    assert args.global_batch_size == 8


def test_global_batch_size_that_does_not_fit_names_values_that_would():
    args = build_parser().parse_args(["--micro-batch-size", "16", "--global-batch-size", "40"])
    with pytest.raises(
        ValueError,
        match=r"--global-batch-size 40 must be a multiple of "
        r"--micro-batch-size x data-parallel size = 16 x 2 = 32: use 32 or 64",
    ):
        resolve_global_batch_size(args, dp_size=2)
    args = build_parser().parse_args(["--micro-batch-size", "16", "--global-batch-size", "16"])
    with pytest.raises(ValueError, match=r"use 32 \(or leave the flag out for 32\)"):
        resolve_global_batch_size(args, dp_size=2)
