"""The files of a Megatron-Core `torch_dist` checkpoint, read and written without Megatron-LM.

    SAVE_DIR/
      latest_checkpointed_iteration.txt   the newest iteration (or "release"), as ours
      iter_0000100/                       `iter_{:07d}` (megatron/training/checkpointing.py)
        metadata.json                     {"sharded_backend": "torch_dist", ...}: written last
        .metadata, __0_0.distcp, ...      torch.distributed.checkpoint index and shards
        common.pt                         older versions: the common state (torch.save)

Megatron-Core's `dist_checkpointing.save` (megatron/core/dist_checkpointing/serialization.py,
strategies/torch.py) stores every ShardedTensor as one global DCP tensor under its key, each
rank's piece a chunk at its global offsets: a tensor-parallel split is a chunking, so the
tensors read the same whatever the layout they were saved from. A ShardedObject is a bytes
item under `{key}/shard_{offset}_{shape}` (dot-joined), holding `torch.save([object])` unaltered
(its planner skips DCP's own serialization). The run's non-tensor state (args, iteration,
optimizer hyper-parameters, ...) is the ShardedObject `common_state` (shape (1,), offset (0,)),
or a `common.pt` file in older versions.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron_hybrid.checkpointing import files
from megatron_hybrid.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    describe_error,
)
from megatron_hybrid.checkpointing.megatron_core.unpickling import load_pickle, load_torch

METADATA_FILE = "metadata.json"  # Megatron-Core's marker: the save is complete
BACKEND = "torch_dist"
COMMON_FILE = "common.pt"  # the common state before Megatron-Core 0.18.2
RELEASE_DIR = "release"  # what `latest` may name instead of an iteration


def object_key(key: str, offset: tuple[int, ...] = (0,), shape: tuple[int, ...] = (1,)) -> str:
    """The DCP key of a ShardedObject piece (`ShardedObject.unique_key`)."""
    dims = ".".join(map(str, offset)), ".".join(map(str, shape))
    return f"{key}/shard_{dims[0]}_{dims[1]}"


COMMON_STATE_KEY = object_key("common_state")
_OBJECT_KEY = re.compile(r"^(?P<key>.+)/shard_[0-9.]+_[0-9.-]+$")


def object_name(dcp_key: str) -> str:
    """The ShardedObject key of a DCP bytes key (`a._extra_state/shard_0_1` -> `a._extra_state`)."""
    match = _OBJECT_KEY.match(dcp_key)
    return match.group("key") if match else dcp_key


# -- finding a checkpoint -------------------------------------------------------------------------
def find_checkpoint(path: str | Path, iteration: int | None = None) -> Path | None:
    """The Megatron-Core checkpoint directory `path` names (itself, its latest, or
    `iteration`), or None when `path` is not one (ours, or nothing: the caller's own lookup
    then reports it). Raises CheckpointCorruptError for an iteration directory that holds a DCP
    index but no `metadata.json` (nor our checkpoint.json): a save that did not finish."""
    path = Path(path)
    if iteration is None and (path / METADATA_FILE).is_file():
        return _checked(path)
    if (path / files.METADATA_FILE).is_file() or not path.is_dir():
        return None
    directory = _named_directory(path, iteration)
    if directory is None:
        return None
    if (directory / METADATA_FILE).is_file():
        return _checked(directory)
    if (directory / files.TENSOR_INDEX_FILE).is_file() and not (
        directory / files.METADATA_FILE
    ).is_file():
        raise CheckpointCorruptError(
            f"{directory / METADATA_FILE} is missing: {directory} holds a "
            f"torch.distributed.checkpoint index ({files.TENSOR_INDEX_FILE}) but neither "
            f"Megatron-Core's {METADATA_FILE} (key 'sharded_backend', written when a save "
            f"completes) nor megatron-hybrid's {files.METADATA_FILE}: the save did not finish; "
            "load an earlier iteration"
        )
    return None


def _named_directory(save_dir: Path, iteration: int | None) -> Path | None:
    if iteration is not None:
        return save_dir / files.iteration_dir_name(iteration)
    latest = save_dir / files.LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_bytes().strip()
    if text == RELEASE_DIR.encode():
        return save_dir / RELEASE_DIR
    if re.fullmatch(rb"[0-9]+", text):
        return save_dir / files.iteration_dir_name(int(text))
    return None  # not a number: our reader reports the file


def _checked(directory: Path) -> Path:
    """`directory`, after checking its metadata.json names the torch_dist backend."""
    path = directory / METADATA_FILE
    try:
        config = json.loads(path.read_bytes())
    except ValueError as error:
        raise CheckpointCorruptError(f"{path} is not valid JSON: {error}") from None
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != BACKEND:
        raise CheckpointCorruptError(
            f"{path}: key 'sharded_backend' is {backend!r}; this version reads Megatron-Core's "
            f"{BACKEND!r} checkpoints (convert others with Megatron-LM's tools first)"
        )
    return directory


# -- reading ---------------------------------------------------------------------------------------
class _IndexedReader(dcp.FileSystemReader):
    """A FileSystemReader whose index was read beforehand, by the stand-in unpickler."""

    def __init__(self, directory: Path, index: Metadata):
        super().__init__(str(directory))
        self.index = index

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if getattr(self.index, "storage_meta", None) is None:
            self.index.storage_meta = StorageMeta()
        self.index.storage_meta.load_id = self.load_id
        return self.index


class _RawBytesPlanner(DefaultLoadPlanner):
    """Keeps a bytes item as the bytes the file holds (DCP's default would unpickle it, with
    Megatron's classes)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()


class MegatronCheckpoint:
    """One Megatron-Core checkpoint directory: its tensor and object index (checked against the
    files), its common state, and reads of whole tensors and raw objects."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.index_path = directory / files.TENSOR_INDEX_FILE
        self.index = self._read_index()
        self._check_files_hold_the_index()
        entries = self.index.state_dict_metadata
        self.tensors = {k: v for k, v in entries.items() if isinstance(v, TensorStorageMetadata)}
        self.objects = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]
        self.common = self._read_common_state()

    def _read_index(self) -> Metadata:
        if not self.index_path.is_file():
            raise CheckpointCorruptError(
                f"{self.index_path} is missing: {self.directory} has Megatron-Core's "
                f"{METADATA_FILE} but no torch.distributed.checkpoint index"
            )
        try:
            index = load_pickle(self.index_path.read_bytes())
        except Exception as error:  # the unpickler's, whatever the bytes made it do
            raise CheckpointCorruptError(
                f"{self.index_path} cannot be read ({describe_error(error)}): truncated or altered"
            ) from error
        if not isinstance(index, Metadata) or not isinstance(index.storage_data, dict):
            raise CheckpointCorruptError(
                f"{self.index_path} holds a {type(index).__name__}, not a "
                "torch.distributed.checkpoint Metadata"
            )
        return index

    def _check_files_hold_the_index(self) -> None:
        """Every item the index places in a file is inside it: a missing or truncated `.distcp`
        is named with the first key it cuts off, before anything is read."""
        sizes: dict[str, int] = {}
        items = self.index.storage_data.items()
        for where, info in sorted(items, key=lambda item: (item[1].relative_path, item[1].offset)):
            path = self.directory / info.relative_path
            if info.relative_path not in sizes:
                sizes[info.relative_path] = path.stat().st_size if path.is_file() else -1
            size, end = sizes[info.relative_path], info.offset + info.length
            if size < 0:
                raise CheckpointCorruptError(
                    f"{path} is missing; {self.index_path} places key {where.fqn!r} in it"
                )
            if size < end:
                raise CheckpointCorruptError(
                    f"{path} is {size} bytes, but {self.index_path} places key {where.fqn!r} at "
                    f"bytes {info.offset}..{end}: the file is truncated"
                )

    def _read_common_state(self) -> dict:
        legacy = self.directory / COMMON_FILE
        if legacy.is_file():
            return self._unpickled(legacy.read_bytes(), str(legacy))
        if COMMON_STATE_KEY not in self.objects:
            return {}
        (common,) = self._unpickled(
            self.read_objects([COMMON_STATE_KEY])[COMMON_STATE_KEY],
            f"key {COMMON_STATE_KEY!r} of {self.directory}",
        )
        return common

    @staticmethod
    def _unpickled(data: bytes, where: str) -> Any:
        try:
            return load_torch(data)
        except Exception as error:
            raise CheckpointCorruptError(
                f"{where} cannot be unpickled ({describe_error(error)})"
            ) from error

    def read_tensors(self, keys) -> dict[str, torch.Tensor]:
        """Whole tensors (every chunk, on CPU) under DCP `keys`, each in its saved dtype."""
        state = {}
        for key in keys:
            info = self.tensors[key]
            state[key] = torch.empty(tuple(info.size), dtype=info.properties.dtype)
        self._load(state, DefaultLoadPlanner(flatten_state_dict=False))
        return state

    def read_objects(self, keys) -> dict[str, bytes]:
        """The raw bytes (a `torch.save` payload) of the ShardedObject pieces `keys`."""
        planner = _RawBytesPlanner()
        self._load({key: io.BytesIO() for key in keys}, planner)
        return planner.raw

    def _load(self, state: dict, planner) -> None:
        try:
            dcp.load(
                state,
                storage_reader=_IndexedReader(self.directory, self.index),
                planner=planner,
                no_dist=True,  # every rank reads the whole tensors it converts
            )
        except Exception as error:
            raise CheckpointCorruptError(
                f"reading {len(state)} entries ({', '.join(list(state)[:3])}, ...) of "
                f"{self.directory} failed: {describe_error(error)}"
            ) from error


def open_checkpoint(path: str | Path, iteration: int | None = None) -> MegatronCheckpoint:
    """The Megatron-Core checkpoint `path` names; CheckpointNotFoundError if it names none."""
    directory = find_checkpoint(path, iteration)
    if directory is None:
        raise CheckpointNotFoundError(
            f"{path} is not a Megatron-Core checkpoint: no {METADATA_FILE} in it, nor in the "
            f"iteration directory its {files.LATEST_FILE} names"
            + ("" if iteration is None else f" (looked for iteration {iteration})")
        )
    return MegatronCheckpoint(directory)


# -- writing ---------------------------------------------------------------------------------------
class _RawBytesSavePlanner(DefaultSavePlanner):
    """Writes a bytes item's payload as it is, as Megatron-Core's MCoreSavePlanner does (its
    loader reads the bytes back with one `torch.load`)."""

    def transform_object(self, write_item, object):
        return object


def object_payload(value: Any) -> io.BytesIO:
    """A ShardedObject's bytes: `torch.save` of the list of its local pieces (one here)."""
    buffer = io.BytesIO()
    torch.save([value], buffer)
    buffer.seek(0)
    return buffer


def write_checkpoint(save_dir: Path, iteration: int, state: dict[str, Any]) -> Path:
    """Write `state` (DCP keys -> tensors, torch ShardedTensors, or BytesIO object payloads) as
    Megatron-Core's checkpoint `iteration` of `save_dir`: the DCP files, then metadata.json,
    then `latest` (each step only after the previous one is complete)."""
    directory = save_dir / files.iteration_dir_name(iteration)
    directory.mkdir(parents=True, exist_ok=False)
    dcp.save(
        state,
        storage_writer=dcp.FileSystemWriter(str(directory)),
        planner=_RawBytesSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
        no_dist=True,
    )
    files.write_text_atomically(
        directory / METADATA_FILE,
        json.dumps({"sharded_backend": BACKEND, "sharded_backend_version": 1}),
    )
    files.write_text_atomically(save_dir / files.LATEST_FILE, f"{iteration}\n")
    return directory
