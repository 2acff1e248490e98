"""Checkpoint error paths: a damaged checkpoint is one CheckpointError naming the file (through
load_checkpoint and through megatron-hybrid-convert), re-saving an iteration survives a crash
at any step, and no checkpoint is ever written from NaN or inf."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
from pathlib import Path

import launch
import pytest
import torch
from test_checkpoint import TOKENS, save, trained_model

from megatron_hybrid.checkpointing.convert import main as convert
from megatron_hybrid.checkpointing.errors import (
    CheckpointCorruptError,
    NonFiniteCheckpointError,
)
from megatron_hybrid.checkpointing.files import LATEST_FILE, METADATA_FILE
from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
from megatron_hybrid.model import HybridModel

ITER_1 = "iter_0000001"


def load_fresh(directory, config, **kwargs) -> HybridModel:
    model = HybridModel(config, seed=7)
    load_checkpoint(directory, model, None, config, **kwargs)
    return model


def convert_error(capsys, *argv: str) -> str:
    """The converter's error for `argv`: exit status 2 and one line on stderr, no traceback."""
    assert convert(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-hybrid-convert: error: ") and err.count("\n") == 1, err
    return err


# -- damaged files -------------------------------------------------------------------------------


def superscript_two_in_latest(directory: Path) -> str:
    (directory / LATEST_FILE).write_text("\u00b2\n")  # str.isdigit() says yes, int() says no
    return rf"{LATEST_FILE}.*iteration number"


def binary_bytes_in_latest(directory: Path) -> str:
    (directory / LATEST_FILE).write_bytes(b"\x00\xff\xfe1\n")
    return rf"{LATEST_FILE}.*iteration number"


def checkpoint_json_is_a_list(directory: Path) -> str:
    (directory / ITER_1 / METADATA_FILE).write_text("[1, 2, 3]\n")
    return rf"{ITER_1}/{METADATA_FILE}.*JSON object.*list"


def checkpoint_json_without_model_config(directory: Path) -> str:
    path = directory / ITER_1 / METADATA_FILE
    meta = json.loads(path.read_text())
    del meta["model_config"]
    path.write_text(json.dumps(meta))
    return rf"{ITER_1}/{METADATA_FILE}.*'model_config'"


def flipped_byte_in_dcp_metadata(directory: Path) -> str:
    flip_bytes(directory / ITER_1 / ".metadata", every=None)
    return rf"{ITER_1}/\.metadata.*CRC32"


def same_size_garbage_in_a_shard(directory: Path) -> str:
    shard = sorted((directory / ITER_1).glob("*.distcp"))[0]
    flip_bytes(shard, every=7)  # headers included: DCP cannot decode it (one byte could pass)
    return rf"{ITER_1}/{shard.name}.*CRC32"


def flip_bytes(path: Path, every: int | None) -> None:
    data = bytearray(path.read_bytes())
    for index in range(0, len(data), every) if every else [len(data) // 2]:
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = [
    superscript_two_in_latest,
    binary_bytes_in_latest,
    checkpoint_json_is_a_list,
    checkpoint_json_without_model_config,
    flipped_byte_in_dcp_metadata,
    same_size_garbage_in_a_shard,
]
# Damage to what `inspect` reads (it reads no shard).
INSPECTED = {
    superscript_two_in_latest,
    binary_bytes_in_latest,
    checkpoint_json_is_a_list,
    checkpoint_json_without_model_config,
    flipped_byte_in_dcp_metadata,
}


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_damaged_checkpoint_loads_as_an_error_naming_the_file_even_without_checksums(
    tmp_path, damage
):
    model, optimizer = trained_model("M-")
    save(tmp_path, 1, model, optimizer)
    expected = damage(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=expected):
        load_checkpoint(
            tmp_path, HybridModel(model.config), None, model.config, verify_checksums=False
        )


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_converter_reports_a_damaged_checkpoint_in_one_line_naming_the_file(
    tmp_path, capsys, damage
):
    model, _ = trained_model("M-")
    save(tmp_path, 1, model)
    expected = damage(tmp_path)
    out = str(tmp_path / "out.safetensors")
    for argv in (
        ["to-safetensors", str(tmp_path), out, "--no-verify-checksums"],
        ["to-safetensors", str(tmp_path), out],
    ):
        assert re.search(expected, convert_error(capsys, *argv))
    if damage in INSPECTED:
        assert re.search(expected, convert_error(capsys, "inspect", str(tmp_path)))
    assert not Path(out).exists()


def test_a_read_failure_inside_dcp_is_a_checkpoint_error_with_its_cause(tmp_path, monkeypatch):
    # DCP wraps every failure in CheckpointException, a BaseException: `except Exception` misses
    # it. A failure the checksums cannot explain (the files are intact) keeps DCP's own words.
    model, _ = trained_model("M-")
    save(tmp_path, 1, model)
    shard = sorted((tmp_path / ITER_1).glob("*.distcp"))[0]

    def unreadable(self, plan, planner):
        raise PermissionError(13, "Permission denied", str(shard))

    monkeypatch.setattr("torch.distributed.checkpoint.FileSystemReader.read_data", unreadable)
    with pytest.raises(CheckpointCorruptError) as info:
        load_fresh(tmp_path, model.config)
    message = str(info.value)
    assert str(tmp_path / ITER_1) in message and f"Permission denied: '{shard}'" in message
    assert "\n" not in message and "Traceback" not in message


def test_latest_naming_a_missing_iteration_is_an_error_not_a_fresh_start(tmp_path):
    # The trainer starts from scratch on CheckpointNotFoundError; a `latest` file says there was
    # a checkpoint, so its loss must stop the run instead.
    model, _ = trained_model("M-")
    save(tmp_path, 1, model)
    shutil.rmtree(tmp_path / ITER_1)
    with pytest.raises(
        CheckpointCorruptError,
        match=rf"{LATEST_FILE} names iteration 1.*"
        rf"{ITER_1} does not exist",
    ):
        load_fresh(tmp_path, model.config)


# -- a crash while re-saving an iteration --------------------------------------------------------


class SimulatedCrash(BaseException):
    """The process dies here (kill -9): nothing after it runs, no `except Exception` sees it."""


def crash_at_change(monkeypatch, number: int) -> list[str]:
    """Make the `number`-th file-system change (a rename, replace or tree removal) from now on
    crash; a tree removal crashes halfway, after deleting half the files. Returns the list of
    changes attempted so far (it grows as they happen)."""
    attempted: list[str] = []

    def guarded(real, name):
        def change(path, *args, **kwargs):
            attempted.append(f"{name} {Path(path).name}")
            if len(attempted) == number:
                if name == "rmtree":
                    doomed = sorted(p for p in Path(path).rglob("*") if p.is_file())
                    for file in doomed[: len(doomed) // 2 + 1]:
                        file.unlink()
                raise SimulatedCrash(attempted[-1])
            return real(path, *args, **kwargs)

        return change

    monkeypatch.setattr(os, "replace", guarded(os.replace, "replace"))
    monkeypatch.setattr(os, "rename", guarded(os.rename, "rename"))
    monkeypatch.setattr(shutil, "rmtree", guarded(shutil.rmtree, "rmtree"))
    return attempted


def test_resaving_the_latest_iteration_survives_a_crash_at_every_step(tmp_path, monkeypatch):
    # `--finetune --load ft --save ft` saves iteration N again while `latest` names N. Crash the
    # re-save at each of its file-system changes in turn, until one run completes: each time,
    # `latest` must still name a complete checkpoint (the old or the new one) that loads, and
    # the next start must leave nothing behind but that checkpoint.
    old_model, _ = trained_model("M-")
    new_model, _ = trained_model("M-", steps=3)
    old_logits, new_logits = old_model(TOKENS), new_model(TOKENS)
    config = old_model.config
    for number in itertools.count(1):
        directory = tmp_path / f"crash_at_{number}"
        save(directory, 1, old_model)
        saver = CheckpointSaver(directory, log=lambda _: None)
        with monkeypatch.context() as patch:
            attempted = crash_at_change(patch, number)
            try:
                saver.save(1, new_model, None, None, config)
            except BaseException:  # SimulatedCrash, or DCP's CheckpointException wrapping it
                assert len(attempted) == number, attempted  # it crashed where we said
            else:
                break
        crashed_at = attempted[-1]
        logits = load_fresh(directory, config)(TOKENS)  # what the next run's --load does first
        assert torch.equal(logits, old_logits) or torch.equal(logits, new_logits), crashed_at
        CheckpointSaver(directory, log=lambda _: None)  # the next run's --save
        assert sorted(p.name for p in directory.iterdir()) == [ITER_1, LATEST_FILE], crashed_at
        assert torch.equal(load_fresh(directory, config)(TOKENS), logits), crashed_at
    assert torch.equal(load_fresh(directory, config)(TOKENS), new_logits)
    assert sorted(p.name for p in directory.iterdir()) == [ITER_1, LATEST_FILE]
    assert number > 3  # the commit's changes were all crashed into, not just DCP's


# -- non-finite state ----------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["parameter", "optimizer"])
def test_non_finite_state_raises_before_anything_is_written(tmp_path, where, value, async_save):
    model, optimizer = trained_model("M-")
    saver = CheckpointSaver(tmp_path, async_save=async_save, log=lambda _: None)
    saver.save(1, model, optimizer, None, model.config)
    saver.finalize()
    written = sorted(p.name for p in tmp_path.iterdir())
    name, param = list(model.named_parameters())[2]
    with torch.no_grad():
        if where == "parameter":
            param.view(-1)[3] = value
        else:
            optimizer.state[param]["exp_avg_sq"].view(-1)[3] = value
    with pytest.raises(NonFiniteCheckpointError, match=rf"iteration 2.*{name}") as info:
        saver.save(2, model, optimizer, None, model.config)
    assert ("exp_avg_sq" in str(info.value)) == (where == "optimizer")
    saver.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    assert (tmp_path / LATEST_FILE).read_text() == "1\n"


def test_large_finite_values_are_saved(tmp_path):
    # Values whose float32 sum overflows to inf are still finite: the check must not refuse them.
    model, _ = trained_model("M-")
    with torch.no_grad():
        next(model.parameters()).view(-1)[:4] = torch.finfo(torch.float32).max
    save(tmp_path, 1, model)
    assert (tmp_path / LATEST_FILE).read_text() == "1\n"


def test_keep_last_never_removes_the_last_finite_checkpoint(tmp_path):
    # No checkpoint is written from non-finite state, so every kept checkpoint is finite; pruning
    # follows a complete save and spares the one `latest` names: the newest finite checkpoint
    # survives a diverged run even with keep_last=1.
    model, _ = trained_model("M-")
    saver = CheckpointSaver(tmp_path, keep_last=1, log=lambda _: None)
    saver.save(1, model, None, None, model.config)
    expected = model(TOKENS)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError):
        saver.save(2, model, None, None, model.config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ITER_1, LATEST_FILE]
    assert torch.equal(load_fresh(tmp_path, model.config)(TOKENS), expected)


def test_non_finite_shard_on_one_rank_stops_the_save_on_every_rank(tmp_path):
    # FSDP2 over 2 ranks (gloo, CPU): NaN in rank 1's local shard only. Both ranks must raise
    # (a rank that went on into DCP's collectives would hang), and nothing is written.
    proc = launch.torchrun(2, Path(__file__).resolve(), str(tmp_path), timeout=300)
    for rank in (0, 1):
        assert f"rank {rank} refused: " in proc.stdout, proc.stdout
    assert "rank 1: embedding.word_embeddings.weight" in proc.stdout, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [ITER_1, LATEST_FILE]
    assert (tmp_path / LATEST_FILE).read_text() == "1\n"


def _non_finite_shard_worker(save_dir: str) -> None:
    import torch.distributed as dist
    from conftest import small_config
    from torch.distributed.fsdp import fully_shard

    from megatron_hybrid.parallel.distributed import end_successful_run

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = HybridModel(small_config("M-"), seed=1)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(TOKENS).logsumexp(-1).mean().backward()
    optimizer.step()  # DTensor moments, checked shard by shard too
    saver = CheckpointSaver(save_dir, log=lambda _: None)
    saver.save(1, model, optimizer, None, model.config)
    if rank == 1:
        with torch.no_grad():
            model.embedding.word_embeddings.weight.to_local().view(-1)[5] = float("nan")
    try:
        saver.save(2, model, optimizer, None, model.config)
    except NonFiniteCheckpointError as error:
        print(f"rank {rank} refused: {error}", flush=True)
    end_successful_run()


if __name__ == "__main__":
    _non_finite_shard_worker(sys.argv[1])


@pytest.mark.parametrize("model_config", [None, "not json", '{"hidden_size": 8}'])
def test_a_safetensors_export_without_a_usable_model_config_is_named(tmp_path, model_config):
    from safetensors.torch import save_file

    from megatron_hybrid.checkpointing.consolidated import SAFETENSORS_FORMAT, load_safetensors

    path = tmp_path / "model.safetensors"
    metadata = {"format": SAFETENSORS_FORMAT}
    if model_config is not None:
        metadata["model_config"] = model_config
    save_file({"embedding.word_embeddings.weight": torch.randn(4, 2)}, str(path), metadata)
    with pytest.raises(CheckpointCorruptError, match=f"{path}: its metadata has no model_config"):
        load_safetensors(path)
