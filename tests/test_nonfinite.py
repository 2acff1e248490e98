"""A NaN or infinite loss or gradient norm stops the run before the optimizer step and before any
save (Megatron-LM's --check-for-nan-in-loss-and-grad), or skips the update when asked to."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from test_training import TINY, run_cli, train

from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser, model_config_from_args
from megatron_hybrid.training.nonfinite import TrainingDivergedError
from megatron_hybrid.training.optimizer import build_optimizer

PATTERN = ["--hybrid-layer-pattern", "[M-]*E", "--moe-router-enable-expert-bias"]


@pytest.fixture
def nan_loss_at(monkeypatch):
    """nan_loss_at(k): the k-th training forward (1-based) returns a NaN loss (and so NaN
    gradients); evaluation forwards (no labels) are untouched."""

    def install(k: int) -> None:
        original, calls = HybridModel.forward, [0]

        def forward(self, input_ids, labels=None):
            out = original(self, input_ids, labels)
            if labels is not None and self.training:
                calls[0] += 1
                if calls[0] == k:
                    return out * math.nan
            return out

        monkeypatch.setattr(HybridModel, "forward", forward)

    return install


def test_a_nan_loss_stops_the_run_before_the_update(nan_loss_at, monkeypatch):
    captured = {}
    original_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # the parameters after the last applied update
        result = original_step(self, *args, **kwargs)
        captured["params"] = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    nan_loss_at(3)
    with pytest.raises(
        TrainingDivergedError,
        match=r"iteration 3: loss nan, gradient norm nan: "
        r"stopping before the optimizer step; this state was not saved",
    ):
        train(*PATTERN, "--train-iters", "5")
    assert len(captured["params"]) > 0
    assert all(torch.isfinite(p).all() for p in captured["params"])


def test_the_cli_reports_divergence_without_a_traceback(capsys, nan_loss_at):
    nan_loss_at(2)
    code, err = run_cli(capsys, *TINY, *PATTERN, "--train-iters", "4")
    assert code == 1
    assert "pretrain_hybrid.py: error: iteration 2: loss nan" in err
    assert "--skip-nonfinite-iterations N" in err and "Traceback" not in err


def test_skipped_iterations_drop_their_gradients(nan_loss_at, tmp_path, monkeypatch):
    steps = []
    original_step = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW,
        "step",
        lambda self, *a, **k: (steps.append(1), original_step(self, *a, **k))[1],
    )
    nan_loss_at(2)
    result = train(
        *PATTERN,
        "--train-iters",
        "4",
        "--log-interval",
        "1",
        "--skip-nonfinite-iterations",
        "1",
        "--log-dir",
        str(tmp_path),
    )
    assert len(steps) == 3  # iterations 1, 3 and 4 update; 2 is skipped
    assert math.isnan(result.losses[1])
    assert all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 1)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_iterations", 0) for r in records if "loss" in r] == [0, 1, 1, 1]


def test_skipping_is_bounded(nan_loss_at):
    nan_loss_at(2)
    with pytest.raises(
        TrainingDivergedError, match="after skipping 0 such iterations|iteration 2: loss nan"
    ):
        train(*PATTERN, "--train-iters", "4", "--skip-nonfinite-iterations", "0")


def test_the_check_can_be_turned_off(nan_loss_at):
    nan_loss_at(2)
    result = train(*PATTERN, "--train-iters", "3", "--no-check-for-nan-in-loss-and-grad")
    assert math.isnan(result.losses[1])


def test_a_diverging_resume_keeps_latest_on_the_last_finite_checkpoint(tmp_path, capsys):
    # The repro: a healthy run saves, then a resume with a diverging learning rate saves
    # every iteration with --keep-last 2.
    save = str(tmp_path / "R")
    code, _ = run_cli(
        capsys, *TINY, *PATTERN, "--train-iters", "4", "--save", save, "--save-interval", "2"
    )
    assert code == 0
    code, err = run_cli(
        capsys,
        *TINY,
        *PATTERN,
        "--train-iters",
        "7",
        "--lr",
        "1e30",
        "--min-lr",
        "1e30",
        "--lr-warmup-iters",
        "0",
        "--lr-decay-style",
        "constant",
        "--log-interval",
        "1",
        "--load",
        save,
        "--save",
        save,
        "--save-interval",
        "1",
        "--keep-last",
        "2",
    )
    assert code == 1 and "loss" in err and "Traceback" not in err, err
    latest = int((tmp_path / "R" / "latest_checkpointed_iteration.txt").read_text())
    assert 4 <= latest < 7
    kept = sorted(p.name for p in (tmp_path / "R").glob("iter_*"))
    assert f"iter_{latest:07d}" in kept and len(kept) <= 2
    args = build_parser().parse_args([*TINY, *PATTERN])
    config = model_config_from_args(args, 257)
    for name in kept:  # every checkpoint left holds finite weights
        model = HybridModel(config, seed=0)
        load_checkpoint(tmp_path / "R" / name, model, None, config)
        assert all(torch.isfinite(p).all() for p in model.parameters()), name


def test_with_the_check_off_a_nan_state_is_still_never_saved(nan_loss_at, tmp_path):
    from megatron_hybrid.checkpointing.errors import NonFiniteCheckpointError

    nan_loss_at(2)
    with pytest.raises(NonFiniteCheckpointError):
        train(
            *PATTERN,
            "--train-iters",
            "3",
            "--no-check-for-nan-in-loss-and-grad",
            "--save",
            str(tmp_path),
            "--save-interval",
            "1",
        )
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("latest")) == [
        "iter_0000001"
    ]


# With a fused AdamW (every CUDA run without tensor or expert parallelism) the check and the
# clipping run on the device: the optimizer kernel skips the update itself and the host judges
# the iteration one step later. Fused AdamW runs on CPU too, which is how these tests reach it.


class FusedTrainers:
    """The trainers built while the fixture is active; `on_device` False makes them take the
    host path with the same fused optimizer (to compare the two paths alone)."""

    def __init__(self):
        self.built, self.on_device = [], True


@pytest.fixture
def fused_adamw(monkeypatch):
    """The trainer builds fused AdamW optimizers (as on CUDA), so it updates on the device."""
    from megatron_hybrid.training import trainer as trainer_module

    monkeypatch.setattr(
        trainer_module, "build_optimizer", functools.partial(build_optimizer, fused=True)
    )
    trainers = FusedTrainers()
    original_init = trainer_module.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        assert self.update_on_device  # every optimizer is fused
        self.update_on_device = trainers.on_device
        trainers.built.append(self)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init)
    return trainers


def test_on_the_device_a_nan_loss_stops_the_run_with_finite_parameters(nan_loss_at, fused_adamw):
    nan_loss_at(3)
    with pytest.raises(
        TrainingDivergedError,
        match=r"iteration 3: loss nan, gradient norm nan: "
        r"stopping before the optimizer step; this state was not saved",
    ):
        train(*PATTERN, "--train-iters", "5")
    (trainer,) = fused_adamw.built
    assert all(torch.isfinite(p).all() for part in trainer.parts for p in part.parameters())
    # iterations 1 and 2 updated; 3 was skipped by the kernel; 4 stopped before its update
    steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {2.0}


def test_on_the_device_skipping_is_logged_as_on_the_host(nan_loss_at, fused_adamw, tmp_path):
    flags = (*PATTERN, "--train-iters", "4", "--log-interval", "1")
    nan_loss_at(2)
    result = train(*flags, "--skip-nonfinite-iterations", "1", "--log-dir", str(tmp_path))
    (trainer,) = fused_adamw.built
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {3.0}
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_iterations", 0) for r in records if "loss" in r] == [0, 1, 1, 1]
    assert math.isnan(result.losses[1])
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_on_the_device_skipping_also_drops_the_expert_bias_update(nan_loss_at, fused_adamw):
    nan_loss_at(1)  # the first iteration is skipped: the biases must still be all zero after it
    result = train(*PATTERN, "--train-iters", "1", "--skip-nonfinite-iterations", "1")
    biases = [b for name, b in result.model.named_buffers() if name.endswith("expert_bias")]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
    unskipped = train(*PATTERN, "--train-iters", "2", "--skip-nonfinite-iterations", "1")
    moved = [b for name, b in unskipped.model.named_buffers() if name.endswith("expert_bias")]
    assert any(torch.count_nonzero(b) > 0 for b in moved)  # so the check above can fail


def test_clipping_on_the_device_matches_clipping_on_the_host(fused_adamw, tmp_path):
    flags = (*PATTERN, "--train-iters", "6", "--log-interval", "1", "--clip-grad", "0.05")
    on_device = train(*flags, "--log-dir", str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0.1 for r in records if "loss" in r)  # every iteration clips
    fused_adamw.on_device = False
    on_host = train(*flags)
    assert [t.update_on_device for t in fused_adamw.built] == [True, False]
    # The same clipped update, reached by grad / divisor inside the kernel instead of
    # grad * coefficient before it: rounding apart (a few float32 ulps per step), equal.
    assert on_device.losses == pytest.approx(on_host.losses, rel=1e-6)


def test_without_clipping_or_check_the_norm_is_computed_for_the_log_only(fused_adamw, tmp_path):
    flags = (*PATTERN, "--train-iters", "3", "--log-interval", "1", "--clip-grad", "0")
    off = ("--no-check-for-nan-in-loss-and-grad",)
    train(*flags, *off, "--log-dir", str(tmp_path / "device"))
    fused_adamw.on_device = False
    train(*flags, *off, "--log-dir", str(tmp_path / "host"))

    def norms(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["grad_norm"] for x in lines if "loss" in json.loads(x)]

    # The same gradients, their norm taken at the log line instead of in the step.
    assert norms("device") == pytest.approx(norms("host"), rel=1e-6)
    assert all(n > 0 for n in norms("device"))
