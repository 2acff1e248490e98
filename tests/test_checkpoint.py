"""Canonical DCP checkpoints: fusion interchange, exact resume, crash safety, mismatch errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import small_config
from test_training import TINY

from megatron_hybrid.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from megatron_hybrid.checkpointing.files import LATEST_FILE
from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
from megatron_hybrid.checkpointing.state import ModelState, TrainProgress
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.optimizer import build_optimizer
from megatron_hybrid.training.trainer import run_training

REPO = Path(__file__).resolve().parents[1]


def trained_model(pattern: str, steps: int = 2, **overrides):
    """A model and optimizer a few AdamW steps away from init (so the state is not trivial)."""
    config = small_config(pattern, **overrides)
    model = HybridModel(config, seed=11)
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, config.vocab_size, (2, 17), generator=gen)
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(directory, iteration, model, optimizer=None, progress=None, **kw):
    CheckpointSaver(directory, log=lambda _: None, **kw).save(
        iteration, model, optimizer, progress, model.config
    )


TOKENS = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("source,target", [("[M-][*E]M-", "M-*EM-"), ("M-*EM-", "[M-][*E]M-")])
def test_fused_and_unfused_checkpoints_load_each_other_with_equal_logits(tmp_path, source, target):
    model, optimizer = trained_model(source)
    save(tmp_path, 3, model, optimizer)
    other = HybridModel(small_config(target), seed=99)  # different init: loading must overwrite
    other_opt = build_optimizer(other, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    load_checkpoint(tmp_path, other, other_opt, other.config)
    torch.testing.assert_close(other(TOKENS), model(TOKENS), atol=0, rtol=0)
    saved = ModelState(model, model.config.pattern).state_dict()
    loaded = ModelState(other, other.config.pattern).state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_optimizer_state_follows_parameters_across_fusions(tmp_path):
    model, optimizer = trained_model("[M-][*E]M-")
    save(tmp_path, 1, model, optimizer)
    other = HybridModel(small_config("M-*EM-"))
    other_opt = build_optimizer(other, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    load_checkpoint(tmp_path, other, other_opt, other.config)
    # Physical block 0's MLP ([M-]) is canonical layer 1, i.e. block 1 of the unfused model.
    src = optimizer.state[model.decoder.layers["0"].channel_mixer.linear_fc1.weight]["exp_avg"]
    dst = other_opt.state[other.decoder.layers["1"].channel_mixer.linear_fc1.weight]["exp_avg"]
    assert torch.equal(src, dst) and src.abs().sum() > 0


def test_checkpoint_records_iteration_config_pattern_and_file_manifest(tmp_path):
    model, optimizer = trained_model("[M-]*E")
    save(tmp_path, 7, model, optimizer, TrainProgress(iteration=7, consumed_train_samples=28))
    assert (tmp_path / LATEST_FILE).read_text().strip() == "7"
    meta = json.loads((tmp_path / "iter_0000007" / "checkpoint.json").read_text())
    assert meta["iteration"] == 7 and meta["consumed_train_samples"] == 28
    assert meta["pattern"] == "[M-]*E" and meta["model_config"]["hidden_size"] == 32
    assert meta["contents"] == ["model", "optimizer", "progress"]
    assert all(info["size"] > 0 for info in meta["files"].values())


def resume_flags(pattern):
    return [
        *TINY,
        "--hybrid-layer-pattern",
        pattern,
        "--train-iters",
        "8",
        "--log-interval",
        "1",
        "--moe-router-enable-expert-bias",
    ]


def train(*flags):
    return run_training(build_parser().parse_args(list(flags)))


def test_resumed_run_reproduces_the_straight_run_bitwise(tmp_path):
    straight = train(*resume_flags("[M-][*E]M-"))
    first = train(*resume_flags("[M-][*E]M-"), "--save", str(tmp_path), "--exit-interval", "4")
    resumed = train(*resume_flags("[M-][*E]M-"), "--load", str(tmp_path))
    assert first.losses == straight.losses[:4]
    assert resumed.losses == straight.losses[4:]  # float32 on CPU: identical, not just close


def test_resume_into_another_fusion_of_the_same_pattern(tmp_path):
    straight = train(*resume_flags("[M-][*E]M-"))
    train(*resume_flags("[M-][*E]M-"), "--save", str(tmp_path), "--exit-interval", "4")
    resumed = train(*resume_flags("M-*EM-"), "--load", str(tmp_path))
    assert resumed.losses == straight.losses[4:]  # fusion changes no op: bitwise equal


def test_load_from_an_empty_directory_starts_from_scratch(tmp_path, capsys):
    result = train(*resume_flags("M-"), "--train-iters", "2", "--load", str(tmp_path))
    assert len(result.losses) == 2
    assert "training from scratch" in capsys.readouterr().out


def test_finetune_loads_weights_and_restarts_the_iteration_count(tmp_path, capsys):
    train(*resume_flags("M-"), "--train-iters", "3", "--save", str(tmp_path))
    result = train(*resume_flags("M-"), "--train-iters", "2", "--load", str(tmp_path), "--finetune")
    assert len(result.losses) == 2
    assert "starting at iteration 0" in capsys.readouterr().out


def test_loading_into_another_model_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model, optimizer = trained_model("M-*E")
    save(tmp_path, 1, model, optimizer)
    other = HybridModel(small_config("M-*-", ffn_hidden_size=40))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(tmp_path, other, None, other.config)
    message = str(info.value)
    assert "decoder.layers.3.mlp.linear_fc1.weight" in message  # missing (the MLP)
    assert "decoder.layers.3.mlp.router.weight" in message  # unexpected (the MoE)
    assert "decoder.layers.1.mlp.linear_fc1.weight checkpoint (48, 32) vs model (40, 32)" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched


def test_truncated_shard_is_an_error_naming_the_file(tmp_path):
    model, _ = trained_model("M-")
    save(tmp_path, 1, model)
    shard = next((tmp_path / "iter_0000001").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointCorruptError, match=rf"{shard.name}.*truncated"):
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)


def test_altered_shard_fails_its_checksum_naming_the_file(tmp_path):
    model, _ = trained_model("M-")
    save(tmp_path, 1, model)
    shard = next((tmp_path / "iter_0000001").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=rf"{shard.name}.*CRC32"):
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)


def test_missing_checkpoint_is_an_error_listing_what_exists(tmp_path):
    model, _ = trained_model("M-")
    save(tmp_path, 2, model)
    with pytest.raises(CheckpointNotFoundError, match="iter_0000002"):
        load_checkpoint(tmp_path, model, None, model.config, iteration=5)


def test_keep_last_prunes_older_checkpoints_after_the_new_one_is_complete(tmp_path):
    model, _ = trained_model("M-")
    saver = CheckpointSaver(tmp_path, keep_last=2, log=lambda _: None)
    for iteration in (1, 2, 3, 4):
        saver.save(iteration, model, None, None, model.config)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000004"]


def test_async_save_writes_the_state_of_the_moment_it_was_called(tmp_path):
    model, optimizer = trained_model("M-")
    expected = model(TOKENS).detach()
    saver = CheckpointSaver(tmp_path, async_save=True, log=lambda _: None)
    saver.save(1, model, optimizer, TrainProgress(iteration=1), model.config)
    with torch.no_grad():  # training goes on while the files are written
        for p in model.parameters():
            p.add_(1.0)
    saver.finalize()
    assert (tmp_path / LATEST_FILE).read_text().strip() == "1"
    fresh = HybridModel(model.config, seed=5)
    load_checkpoint(tmp_path, fresh, None, model.config)
    torch.testing.assert_close(fresh(TOKENS), expected, atol=0, rtol=0)


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch.distributed.checkpoint.filesystem as fs
    from test_checkpoint import trained_model
    from megatron_hybrid.checkpointing.manager import CheckpointSaver

    model, optimizer = trained_model("[M-]*E")
    saver = CheckpointSaver({directory!r}, log=print)
    saver.save(1, model, optimizer, None, model.config)

    original = fs.FileSystemWriter.write_data
    def write_then_hang(self, plan, planner):
        result = original(self, plan, planner)  # shard files are written, nothing committed
        print("WRITING", flush=True)
        time.sleep(600)
        return result
    fs.FileSystemWriter.write_data = write_then_hang
    saver.save(2, model, optimizer, None, model.config)
""")


def test_process_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), directory=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while "WRITING" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the saving process ended early"
        assert "WRITING" in line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / LATEST_FILE).read_text().strip() == "1"
    assert not (tmp_path / "iter_0000002").exists()
    assert any(tmp_path.glob(".iter_0000002.partial/*.distcp"))  # killed mid-save, really
    model, optimizer = trained_model("[M-]*E")
    fresh = HybridModel(model.config, seed=3)
    load_checkpoint(tmp_path, fresh, None, model.config)
    torch.testing.assert_close(fresh(TOKENS), model(TOKENS), atol=0, rtol=0)
    # The next save clears the dead partial directory.
    save(tmp_path, 3, fresh)
    assert not list(tmp_path.glob(".iter_*.partial"))


def test_loading_a_checkpoint_of_another_config_warns_naming_the_fields(tmp_path):
    model, _ = trained_model("[M-]*")
    save(tmp_path, 1, model)
    other = HybridModel(small_config("M-*", position_embedding_type="rope", mamba_chunk_size=4))
    messages = []
    load_checkpoint(tmp_path, other, None, other.config, log=messages.append)
    assert len(messages) == 1
    assert "position_embedding_type: checkpoint 'none', now 'rope'" in messages[0]
    assert "mamba_chunk_size: checkpoint 8, now 4" in messages[0]
    assert "hybrid_layer_pattern" not in messages[0]  # same layers, other fusion


def test_rng_states_come_back_on_resume(tmp_path):
    model, optimizer = trained_model("M-")
    torch.manual_seed(123)
    save(tmp_path, 1, model, optimizer, TrainProgress(iteration=1))
    expected = torch.rand(3)
    torch.manual_seed(999)
    progress = TrainProgress()
    load_checkpoint(tmp_path, model, optimizer, model.config, progress=progress)
    progress.restore_rng()
    assert torch.equal(torch.rand(3), expected)
