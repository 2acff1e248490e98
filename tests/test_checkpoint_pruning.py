"""--keep-last prunes only after the new checkpoint is complete: a save that fails while writing
its files (disk full, say) leaves every kept checkpoint in place, `latest` on the newest of
them, and each loadable as saved."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from test_checkpoint import TOKENS, trained_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_hybrid.checkpointing.files import LATEST_FILE
from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
from megatron_hybrid.model import HybridModel


def kept(directory) -> list[str]:
    return sorted(p.name for p in directory.glob("iter_*"))


def save_distinct(saver: CheckpointSaver, model: HybridModel, iteration: int) -> torch.Tensor:
    """Move the weights (so every checkpoint differs), save them as `iteration` and return
    their logits on TOKENS."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * iteration)
        logits = model(TOKENS)
    saver.save(iteration, model, None, None, model.config)
    return logits


def fail_after_writing_the_shards(monkeypatch) -> None:
    write_data = dcp_filesystem.FileSystemWriter.write_data

    def write_then_fail(self, plan, planner):
        write_data(self, plan, planner)  # the shard files are on disk, nothing is committed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_filesystem.FileSystemWriter, "write_data", write_then_fail)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_save_leaves_the_kept_checkpoints_intact(tmp_path, monkeypatch, async_save):
    model, _ = trained_model("M-")
    saver = CheckpointSaver(tmp_path, keep_last=2, async_save=async_save, log=lambda _: None)
    logits = {iteration: save_distinct(saver, model, iteration) for iteration in (1, 2, 3)}
    saver.finalize()
    assert kept(tmp_path) == ["iter_0000002", "iter_0000003"]

    fail_after_writing_the_shards(monkeypatch)
    with pytest.raises(CheckpointException, match="No space left on device"):
        save_distinct(saver, model, 4)
        saver.finalize()  # an async save's failure surfaces here
    assert any(tmp_path.glob(".iter_0000004.partial/*.distcp"))  # it failed mid-way, really
    assert kept(tmp_path) == ["iter_0000002", "iter_0000003"]
    assert (tmp_path / LATEST_FILE).read_text().strip() == "3"
    for iteration in (2, 3):
        fresh = HybridModel(model.config, seed=7)
        load_checkpoint(tmp_path, fresh, None, model.config, iteration=iteration)
        torch.testing.assert_close(fresh(TOKENS), logits[iteration], atol=0, rtol=0)

    monkeypatch.undo()  # the disk has room again: the next save commits, then prunes
    save_distinct(saver, model, 5)
    saver.finalize()
    assert kept(tmp_path) == ["iter_0000003", "iter_0000005"]
    assert not any(tmp_path.glob(".iter_*.partial"))
