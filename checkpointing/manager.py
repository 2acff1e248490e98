"""Saving and loading training checkpoints: canonical keys, DCP files, crash-safe commits.

saver = CheckpointSaver(save_dir, keep_last=3, async_save=True)
saver.save(iteration, model, optimizer, progress, config)   # returns once staged
saver.poll()                                                # commits finished async saves
saver.finalize()                                            # waits for the last one

progress = load_checkpoint(load_dir, model, optimizer, config)
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_hybrid.checkpointing import files
from megatron_hybrid.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    describe_error,
)
from megatron_hybrid.checkpointing.finite import check_finite
from megatron_hybrid.checkpointing.parts import ModelPartsState, OptimizerPartsState, as_parts
from megatron_hybrid.checkpointing.state import TrainProgress
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.data.tokenizer import TokenizerSettings, tokenizer_record
from megatron_hybrid.parallel.distributed import all_ranks_agree


def checkpoint_state(model, optimizer, progress: TrainProgress | None, config: ModelConfig) -> dict:
    """The Stateful objects one checkpoint holds (optimizer and progress optional). `model` is
    a model or a list of this rank's pipeline stages (`optimizer` then an OptimizerParts)."""
    parts = as_parts(model)
    state = {"model": ModelPartsState(parts, config.pattern)}
    if optimizer is not None:
        state["optimizer"] = OptimizerPartsState(parts, optimizer, config.pattern)
    if progress is not None:
        state["progress"] = progress
    return state


@dataclass(frozen=True)
class Attachment:
    """What every checkpoint of a saver carries beside the tensors: `metadata` fields added to
    checkpoint.json, and `files` ({name in the checkpoint directory: source file}) copied in
    before the manifest is written, so their sizes and CRC32s are checked like the shards'.
    (The training run attaches its tokenizer: megatron_hybrid/data/tokenizer.py.)"""

    metadata: Mapping[str, object] = field(default_factory=dict)
    files: Mapping[str, Path] = field(default_factory=dict)


def tokenizer_attachment(settings: TokenizerSettings) -> Attachment:
    """The tokenizer a checkpoint records (megatron-hybrid-generate reads it back), its files
    copied in."""
    record, copies = tokenizer_record(settings)
    return Attachment({"tokenizer": record}, {name: Path(p) for name, p in copies.items()})


class CheckpointSaver:
    """Writes `iter_*` checkpoints under `save_dir`, at most one save in flight, never from
    non-finite state (NonFiniteCheckpointError). Starting one puts `save_dir` back in order
    after a killed save (files.finish_interrupted_saves). Every rank constructs it and calls
    `save`, `poll` and `finalize` together."""

    def __init__(
        self,
        save_dir: str | os.PathLike,
        keep_last: int | None = None,
        async_save: bool = False,
        log=print,
        attachment: Attachment | None = None,
    ):
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"keep_last must be at least 1, got {keep_last}")
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        self.log = log
        self.attachment = attachment or Attachment()
        self._pending: tuple[Future, Path, int, dict] | None = None
        # Saves (async ones in a background thread) coordinate over their own gloo group, so
        # they never interleave with the training's collectives on the default group.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._is_main = not dist.is_initialized() or dist.get_rank() == 0
        self._finish_interrupted_saves()

    def save(
        self,
        iteration: int,
        model,
        optimizer,
        progress: TrainProgress | None,
        config: ModelConfig,
        extra_metadata: dict | None = None,
    ) -> None:
        """Save (or, with async_save, stage and start writing) checkpoint `iteration`.
        Raises NonFiniteCheckpointError on every rank, before anything is written, when any
        rank's parameters or optimizer state hold NaN or inf."""
        self.finalize()  # one save in flight: the previous one commits first
        check_finite(
            model,
            optimizer,
            f"checkpoint iteration {iteration} to {self.save_dir}",
            group=self._group,
        )
        if self._is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self._finish_interrupted_saves()
        partial = files.partial_dir(self.save_dir, iteration)
        state = checkpoint_state(model, optimizer, progress, config)
        metadata = {
            "format": files.FORMAT,
            "format_version": files.FORMAT_VERSION,
            "iteration": iteration,
            "consumed_train_samples": progress.consumed_train_samples if progress else 0,
            "contents": sorted(state),
            "pattern": config.hybrid_layer_pattern,
            "model_config": config.to_dict(),
            "torch_version": torch.__version__,
            **self.attachment.metadata,
            **(extra_metadata or {}),
        }
        writer = dcp.FileSystemWriter(str(partial))
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self._group)
            self._pending = (future, partial, iteration, metadata)
        else:
            dcp.save(state, storage_writer=writer, process_group=self._group)
            self._commit(partial, iteration, metadata)

    def poll(self) -> None:
        """Commit an async save once every rank has written its files; never blocks on I/O
        (with several ranks it is a small collective: all ranks call it together)."""
        if self._pending is not None and all_ranks_agree(self._pending[0].done()):
            self.finalize()

    def finalize(self) -> None:
        """Wait for the save in flight (if any) and commit it."""
        if self._pending is None:
            return
        future, partial, iteration, metadata = self._pending
        self._pending = None
        future.result()  # re-raises a failed write: the partial directory is never committed
        self._commit(partial, iteration, metadata)

    def _finish_interrupted_saves(self) -> None:
        if self._is_main and self.save_dir.is_dir():
            for note in files.finish_interrupted_saves(self.save_dir):
                self.log(f"{self.save_dir}: {note} (left by an interrupted save)")
        self._barrier()

    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    def _commit(self, partial: Path, iteration: int, metadata: dict) -> None:
        self._barrier()  # every rank's files are written
        if self._is_main:
            self._publish(partial, iteration, metadata)
        self._barrier()  # no rank goes on (to load, or save again) before `latest` moved

    def _publish(self, partial: Path, iteration: int, metadata: dict) -> None:
        for name, source in self.attachment.files.items():
            shutil.copyfile(source, partial / name)
        metadata["files"] = files.file_manifest(partial)
        metadata["saved_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        files.write_text_atomically(
            partial / files.METADATA_FILE, json.dumps(metadata, indent=2) + "\n"
        )
        final = files.commit(self.save_dir, partial, iteration)
        removed = files.prune(self.save_dir, self.keep_last) if self.keep_last else []
        note = f" (removed {', '.join(p.name for p in removed)})" if removed else ""
        self.log(f"saved checkpoint {final}{note}")


def load_checkpoint(
    path: str | os.PathLike,
    model,
    optimizer,
    config: ModelConfig,
    progress: TrainProgress | None = None,
    iteration: int | None = None,
    verify_checksums: bool = True,
    log=None,
) -> TrainProgress | None:
    """Load a checkpoint (a save directory's latest, its `iteration`, or an `iter_*` directory)
    into `model` and, when given (not None) and present in the checkpoint, `optimizer` and
    `progress`.

    Everything is checked before any tensor is touched: the files against their manifest
    (CheckpointCorruptError names the file; without `verify_checksums` only sizes and the
    tensor index's checksum), the checkpoint's keys and shapes against the model and optimizer
    (CheckpointMismatchError lists missing, unexpected and mis-shaped keys).
    Returns the loaded TrainProgress (its RNG states are restored by `restore_rng()`, at the
    caller's choice), or None when the checkpoint holds only a model.

    A Megatron-Core `torch_dist` checkpoint (found by its metadata.json) loads the same way
    (checkpointing/megatron_core/load.py)."""
    from megatron_hybrid.checkpointing import megatron_core

    if megatron_core.find_checkpoint(path, iteration) is not None:
        return megatron_core.load_megatron_checkpoint(
            path, model, optimizer, config, progress, iteration, log
        )
    directory = files.resolve_checkpoint_dir(path, iteration)
    meta = files.read_checkpoint_metadata(directory)
    _verify_once(directory, meta, verify_checksums)
    differences = config_differences(meta["model_config"], config)
    contents = set(meta.get("contents", ()))
    if progress is None:
        contents.discard("progress")
    state = checkpoint_state(
        model,
        optimizer if "optimizer" in contents else None,
        progress if "progress" in contents else None,
        config,
    )
    check_tensors_fit(files.read_tensor_index(directory), state, directory, differences)
    if differences and log is not None:  # only now known to be harmless
        log(
            f"warning: {directory} was saved with another model config; loading anyway "
            "(tensor shapes match):\n  " + "\n  ".join(differences)
        )
    load_dcp_state(state, directory, meta, checksums_verified=verify_checksums)
    return progress if "progress" in contents else None


def load_dcp_state(state: dict, directory: Path, meta: dict, checksums_verified: bool) -> None:
    """dcp.load `state` from `directory` (a collective under torch.distributed). DCP reports a
    failure as CheckpointException (a BaseException, holding each failed rank's error, raised
    on every rank) and names no file: it becomes a CheckpointCorruptError that names the
    damaged file when checksums were skipped and now find one, or else quotes the error."""
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)))
    except (Exception, CheckpointException) as error:
        failures = error.failures if isinstance(error, CheckpointException) else {}
        rank = min(failures, default=None)
        cause = failures[rank][0] if failures else error
        if not isinstance(cause, Exception):  # KeyboardInterrupt, SystemExit inside DCP
            raise
        if failures and not checksums_verified:  # every rank is here: _verify_once is safe
            _verify_once(directory, meta, checksums=True)
        where = f" on rank {rank}" if dist.is_initialized() and failures else ""
        raise CheckpointCorruptError(
            f"reading checkpoint {directory} failed{where}: {describe_error(cause)}"
        ) from error


def config_differences(saved: dict, config: ModelConfig) -> list[str]:
    """Fields of the checkpoint's model config that differ from `config`, as readable lines.
    Fusion groups and pipeline stages are a layout, not a difference: patterns compare by their
    canonical sub-layers. (Differences that change tensor shapes also fail the key check.)"""
    current = config.to_dict()
    lines = []
    for name, value in saved.items():
        if name == "hybrid_layer_pattern":
            saved_layers = "".join(ch for ch in value if ch not in "[]|")
            now_layers = "".join(ch for ch in config.hybrid_layer_pattern if ch not in "[]|")
            if saved_layers != now_layers:
                lines.append(
                    f"hybrid_layer_pattern: checkpoint {value!r}, now "
                    f"{config.hybrid_layer_pattern!r}"
                )
        elif name in current and current[name] != value:
            lines.append(f"{name}: checkpoint {value!r}, now {current[name]!r}")
    return lines


def _verify_once(directory: Path, meta: dict, checksums: bool) -> None:
    """Rank 0 checks the files (reading each once); every rank raises if it failed."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            files.verify_manifest(directory, meta["files"], checksums=checksums)
        except CheckpointCorruptError as caught:
            error = str(caught)
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise CheckpointCorruptError(error)


def check_tensors_fit(
    index: dcp.Metadata, state: dict, directory: Path, config_differences=()
) -> None:
    """Compare every tensor the load would fill with the checkpoint's tensor index: raise
    CheckpointMismatchError listing every difference (for the model first, it is what users
    change), before DCP touches anything. A key is unexpected only if no rank wants it (a
    pipeline rank loads only its stages' keys)."""
    shapes = {
        key: tuple(meta.size)
        for key, meta in index.state_dict_metadata.items()
        if hasattr(meta, "size")
    }
    check_shapes_fit(shapes, state, directory, config_differences)


def check_shapes_fit(
    shapes: dict[str, tuple[int, ...]], state: dict, where, config_differences=()
) -> None:
    """`check_tensors_fit` against `shapes`, the checkpoint's tensors as DCP keys them
    (`model.decoder...`, `optimizer.state....exp_avg`); `where` names the checkpoint."""
    for part in state:
        wanted = _flat_tensor_shapes(state[part].state_dict(), part)
        have = {key: shape for key, shape in shapes.items() if key.startswith(part + ".")}
        wanted_anywhere = set(wanted)
        if dist.is_initialized() and dist.get_world_size() > 1:
            every_rank: list = [None] * dist.get_world_size()
            dist.all_gather_object(every_rank, sorted(wanted))
            wanted_anywhere = set().union(*map(set, every_rank))
        missing = sorted(set(wanted) - set(have))
        unexpected = sorted(set(have) - wanted_anywhere)
        mismatched = [
            (k, have[k], wanted[k]) for k in sorted(set(have) & set(wanted)) if have[k] != wanted[k]
        ]
        if missing or unexpected or mismatched:
            strip = len(part) + 1
            raise CheckpointMismatchError(
                f"the {part} ({where})",
                [k[strip:] for k in missing],
                [k[strip:] for k in unexpected],
                [(k[strip:], s, w) for k, s, w in mismatched],
                config_differences,
            )


def _flat_tensor_shapes(state, prefix: str) -> dict[str, tuple[int, ...]]:
    """DCP's flattened key (dots between nested dict keys) -> shape, for tensors only."""
    out = {}
    if isinstance(state, dict):
        for key, value in state.items():
            out.update(_flat_tensor_shapes(value, f"{prefix}.{key}"))
    elif isinstance(state, torch.Tensor):
        out[prefix] = tuple(state.shape)
    return out
