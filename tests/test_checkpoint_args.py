"""--use-checkpoint-args builds the model the checkpoint records (Megatron-LM's flag), and a
load into another model says how the configs differ instead of first claiming it fits."""

from __future__ import annotations

import pytest
from test_training import TINY

from megatron_hybrid.checkpointing.errors import CheckpointMismatchError
from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser, model_config_from_args
from megatron_hybrid.training.trainer import run_training

PATTERN = ["--hybrid-layer-pattern", "[M-]*E"]
# TINY's flags that are not model flags (the model ones must come from the checkpoint).
RUN = [
    "--seq-length", "24", "--micro-batch-size", "4", "--lr", "1e-2", "--min-lr", "1e-3",
    "--lr-warmup-iters", "2", "--eval-iters", "0", "--generate-tokens", "0",
    "--no-progress-bar", "--log-interval", "1",
]  # fmt: skip


def train(*flags):
    return run_training(build_parser().parse_args(list(flags)))


def test_a_resume_needs_no_model_flags(tmp_path):
    save = str(tmp_path)
    whole = train(*TINY, *PATTERN, "--train-iters", "4")
    train(*TINY, *PATTERN, "--train-iters", "4", "--exit-interval", "2", "--save", save)
    resumed = train(*RUN, "--train-iters", "4", "--load", save, "--use-checkpoint-args")
    assert resumed.model.config == whole.model.config
    assert resumed.losses == whole.losses[2:]  # the same run, continued bitwise


def test_it_needs_load(capsys):
    from megatron_hybrid.training.cli import main

    assert main([*RUN, "--use-checkpoint-args"]) == 2
    assert "--use-checkpoint-args needs --load DIR" in capsys.readouterr().err


def test_a_misfit_names_the_config_differences_and_never_claims_to_load(tmp_path):
    train(*TINY, *PATTERN, "--train-iters", "1", "--save", str(tmp_path))
    args = build_parser().parse_args([*TINY, *PATTERN, "--hidden-size", "48"])
    config = model_config_from_args(args, 257)
    messages = []
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(tmp_path, HybridModel(config, seed=0), None, config, log=messages.append)
    assert "hidden_size" in str(error.value) and "--use-checkpoint-args" in str(error.value)
    assert not [m for m in messages if "loading anyway" in m]
