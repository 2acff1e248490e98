"""What the load flags promise, checked by what a run observes: --finetune trains the
checkpoint's weights from iteration 0, --no-load-optim starts with fresh Adam moments,
--no-load-rng keeps the current random streams (the default puts the saved ones back),
--no-verify-checksums reads a shard whose contents changed, and a resume with other schedule
flags says which settings changed."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import TINY

from megatron_hybrid.checkpointing.errors import CheckpointCorruptError
from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
from megatron_hybrid.checkpointing.state import TrainProgress
from megatron_hybrid.data.tokenizer import build_tokenizer
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training import trainer
from megatron_hybrid.training.arguments import (
    build_parser,
    check_training_args,
    model_config_from_args,
    resolve_global_batch_size,
    settings_from_args,
)
from megatron_hybrid.training.optimizer import LRSchedule, build_optimizer, lr_schedule_warning
from megatron_hybrid.training.progress import ProgressReporter

FLAGS = [*TINY, "--hybrid-layer-pattern", "M*-", "--train-iters", "3", "--log-interval", "1"]
MLP_WEIGHT = "decoder.layers.2.channel_mixer.linear_fc1.weight"  # block 2 of "M*-"
SCHEDULE_SETTINGS = [f.name for f in dataclasses.fields(LRSchedule)]


def parse(*flags: str):
    """FLAGS and `flags` as run_training reads them in one process."""
    args = build_parser().parse_args([*FLAGS, *flags])
    check_training_args(args)
    resolve_global_batch_size(args, dp_size=1)
    return args


def train(*flags: str):
    return trainer.run_training(parse(*flags))


def fresh_model(args) -> tuple[HybridModel, object]:
    """The model the flags describe, initialized unlike the trainer's (another seed), so a load
    has to overwrite every tensor to look like the checkpoint."""
    config = model_config_from_args(args, build_tokenizer(args).vocab_size)
    return HybridModel(config, seed=args.seed + 1), config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run of 3 iterations (lr 1e-2: far from its initial weights), saved at its end."""
    path = tmp_path_factory.mktemp("trained")
    train("--save", str(path))
    return path


def resume(checkpoint: Path, *flags: str, seed_before: int | None = None):
    """trainer.resume as run_training calls it, into a fresh model and AdamW: returns the
    model, the optimizer, the progress it returns and what it reported. `seed_before` seeds
    every RNG right before the resume (building the model draws from torch's)."""
    args = parse("--load", str(checkpoint), *flags)
    model, config = fresh_model(args)
    optimizer = build_optimizer(
        model, args.lr, args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_eps
    )
    output = io.StringIO()
    reporter = ProgressReporter(args.train_iters, None, live=False, stream=output)
    if seed_before is not None:
        seed_all(seed_before)
    progress = trainer.resume(
        settings_from_args(args).checkpoint, [model], optimizer, config, TrainProgress(), reporter
    )
    return model, optimizer, progress, output.getvalue()


# -- --finetune --------------------------------------------------------------------------------


def first_iteration_batch(args) -> torch.Tensor:
    """The samples the first iteration of a run from scratch reads: global samples 0 .. global
    batch - 1 (one process, one micro-batch)."""
    train_data = trainer.build_training_data(settings_from_args(args), build_tokenizer(args))[0]
    return train_data.batch(0, args.global_batch_size)


def loss_on(model: HybridModel, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(batch[:, :-1], batch[:, 1:]))


def test_finetune_trains_the_checkpoint_weights_from_iteration_0(checkpoint, tmp_path):
    flags = [
        "--train-iters",
        "2",
        "--load",
        str(checkpoint),
        "--finetune",
        "--save",
        str(tmp_path / "ckpt"),
        "--log-dir",
        str(tmp_path),
    ]
    result = train(*flags)
    args = parse(*flags)
    batch = first_iteration_batch(args)
    from_checkpoint, config = fresh_model(args)
    load_checkpoint(checkpoint, from_checkpoint, None, config)
    untrained, _ = fresh_model(args)
    # The same float32 forward on the same weights and batch: identical, not just close.
    assert result.losses[0] == loss_on(from_checkpoint, batch)
    assert abs(result.losses[0] - loss_on(untrained, batch)) > 0.05  # the load is visible
    # Counting restarts: iterations 1, 2 (the schedule's warmup from its start), and the
    # finetune's own checkpoint holds its 2 iterations' samples only.
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(args.lr / args.lr_warmup_iters)
    meta = json.loads((tmp_path / "ckpt" / "iter_0000002" / "checkpoint.json").read_text())
    assert meta["consumed_train_samples"] == 2 * args.global_batch_size


# -- --no-load-optim ---------------------------------------------------------------------------


def test_no_load_optim_starts_with_fresh_adam_moments(checkpoint):
    model, optimizer, progress, _ = resume(checkpoint)
    params = list(model.parameters())
    assert len(optimizer.state) == len(params)
    for param in params:
        state = optimizer.state[param]
        assert float(state["step"]) == 3
        assert state["exp_avg"].abs().sum() > 0 and state["exp_avg_sq"].abs().sum() > 0

    fresh_moments, optimizer, progress, _ = resume(checkpoint, "--no-load-optim")
    assert len(optimizer.state) == 0  # AdamW creates its moments at its first step
    assert progress.iteration == 3  # the rest of the checkpoint loads as without the flag
    for loaded, also_loaded in zip(params, fresh_moments.parameters(), strict=True):
        assert torch.equal(loaded, also_loaded)


# -- --no-load-rng -----------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_states() -> tuple:
    """The torch, numpy and Python RNG states, as comparable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (
        bytes(torch.get_rng_state().numpy()),
        (kind, keys.tobytes(), pos, has_gauss, cached),
        random.getstate(),
    )


@pytest.fixture
def rng_checkpoint(tmp_path) -> tuple[Path, tuple]:
    """A checkpoint of FLAGS' model saved with seeded RNG streams, and their states then."""
    model, config = fresh_model(parse())
    seed_all(123)
    saved = rng_states()
    CheckpointSaver(tmp_path, log=lambda _: None).save(3, model, None, TrainProgress(3, 12), config)
    assert rng_states() == saved  # the save itself draws nothing
    return tmp_path, saved


def test_resume_restores_the_saved_rng_streams(rng_checkpoint):
    path, saved = rng_checkpoint
    resume(path, seed_before=999)
    assert rng_states() == saved


def test_no_load_rng_keeps_the_current_rng_streams(rng_checkpoint):
    path, saved = rng_checkpoint
    resume(path, "--no-load-rng", seed_before=999)
    after = rng_states()
    seed_all(999)
    assert after == rng_states() != saved


# -- --no-verify-checksums ---------------------------------------------------------------------


def flip_sign_of_first_element(directory: Path, tensor: torch.Tensor) -> Path:
    """Negate tensor[0, 0] where its bytes lie in the shard: the file keeps its size, so only the
    checksum can tell. Returns the shard."""
    needle = tensor.detach().numpy().tobytes()
    for shard in directory.glob("*.distcp"):
        data = bytearray(shard.read_bytes())
        if data.count(needle) == 1:
            data[data.find(needle) + 3] ^= 0x80  # the sign bit of a little-endian float32
            shard.write_bytes(bytes(data))
            return shard
    raise AssertionError("the tensor's bytes are not in exactly one shard")


def test_no_verify_checksums_loads_a_shard_altered_in_place(tmp_path):
    model, config = fresh_model(parse())
    CheckpointSaver(tmp_path, log=lambda _: None).save(3, model, None, TrainProgress(3, 12), config)
    weight = model.get_parameter(MLP_WEIGHT).detach()
    shard = flip_sign_of_first_element(tmp_path / "iter_0000003", weight)
    with pytest.raises(CheckpointCorruptError, match=rf"{re.escape(str(shard))}.*CRC32"):
        resume(tmp_path)
    loaded, *_ = resume(tmp_path, "--no-verify-checksums")
    expected = weight.clone()
    expected[0, 0] = -expected[0, 0]
    assert torch.equal(loaded.get_parameter(MLP_WEIGHT), expected)


# -- learning-rate schedule settings -----------------------------------------------------------


def test_resume_with_other_schedule_flags_warns_naming_each_change(checkpoint, tmp_path, capsys):
    train("--train-iters", "5", "--lr", "5e-3", "--load", str(checkpoint), "--save", str(tmp_path))
    out = capsys.readouterr().out
    assert f"warning: {checkpoint} was saved with other learning-rate schedule settings" in out
    assert "max_lr (--lr): checkpoint 0.01, now 0.005" in out
    assert "decay_iters (--lr-decay-iters (default --train-iters)): checkpoint 3, now 5" in out
    assert "min_lr" not in out and "warmup_iters" not in out and "style" not in out
    # The run's own checkpoint records the settings it followed.
    progress = TrainProgress(lr_schedule=dict.fromkeys(SCHEDULE_SETTINGS))
    model, config = fresh_model(parse())
    load_checkpoint(tmp_path, model, None, config, progress=progress)
    assert progress.saved_lr_schedule["max_lr"] == 5e-3
    assert progress.saved_lr_schedule["decay_iters"] == 5


def test_resume_with_the_same_schedule_does_not_warn(checkpoint, capsys):
    train("--train-iters", "4", "--lr-decay-iters", "3", "--load", str(checkpoint))
    out = capsys.readouterr().out
    assert "resumed from" in out and "learning-rate schedule" not in out


def test_a_load_keeps_the_runs_schedule_settings_beside_the_checkpoints(checkpoint):
    current = dict(max_lr=5e-3, min_lr=1e-3, warmup_iters=2, decay_iters=3, style="linear")
    progress = TrainProgress(lr_schedule=dict(current))
    model, config = fresh_model(parse())
    load_checkpoint(checkpoint, model, None, config, progress=progress)
    assert progress.lr_schedule == current
    assert progress.saved_lr_schedule == dict(
        max_lr=1e-2, min_lr=1e-3, warmup_iters=2, decay_iters=3, style="cosine"
    )
    warning = lr_schedule_warning(progress.saved_lr_schedule, progress.lr_schedule, "ckpt")
    assert warning.splitlines()[1:] == [
        "  max_lr (--lr): checkpoint 0.01, now 0.005",
        "  style (--lr-decay-style): checkpoint 'cosine', now 'linear'",
    ]
    # Nothing to compare with: a checkpoint without the settings, or a run without them.
    assert lr_schedule_warning({}, current, "ckpt") is None
    assert lr_schedule_warning(progress.saved_lr_schedule, {}, "ckpt") is None
