"""The on-disk layout of a checkpoint directory and the file operations that keep it crash-safe.

    SAVE_DIR/
      latest_checkpointed_iteration.txt     Megatron's name; written last, atomically
      iter_0000100/                         one complete checkpoint
        .metadata, __0_0.distcp, ...        torch.distributed.checkpoint files
        checkpoint.json                     iteration, model config, pattern, file manifest
      .iter_0000200.partial/                a save in progress (or killed): never loaded

A save writes into the `.partial` directory, records sizes and CRC32s of every file in
`checkpoint.json`, renames the directory to `iter_*` (atomic on one filesystem) and only then
rewrites the `latest` file (atomic replace). A process killed at any point therefore leaves the
previous `latest` checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

from megatron_hybrid.checkpointing.errors import CheckpointCorruptError, CheckpointNotFoundError

LATEST_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "checkpoint.json"
FORMAT = "megatron-hybrid/canonical-dcp"
FORMAT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def partial_dir(save_dir: Path, iteration: int) -> Path:
    return save_dir / f".{iteration_dir_name(iteration)}.partial"


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_manifest(directory: Path) -> dict[str, dict]:
    """{relative name: {size, crc32}} of every file a save wrote (checkpoint.json excluded)."""
    manifest = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != METADATA_FILE:
            manifest[path.name] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    return manifest


def verify_manifest(directory: Path, manifest: dict[str, dict], checksums: bool = True) -> None:
    """Raise CheckpointCorruptError naming the first file that is missing, of another size than
    written, or (with `checksums`) whose CRC32 differs."""
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointCorruptError(f"checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointCorruptError(
                f"checkpoint file {path} is {size} bytes, but {expected['size']} were written: "
                "the file is truncated or was replaced; load an earlier iteration instead")
        if checksums and _crc32(path) != expected["crc32"]:
            raise CheckpointCorruptError(
                f"checkpoint file {path} fails its CRC32 check (expected {expected['crc32']:08x}): "
                "its contents changed after the save; load an earlier iteration instead")


def read_checkpoint_metadata(directory: Path) -> dict:
    path = directory / METADATA_FILE
    if not path.is_file():
        raise CheckpointCorruptError(
            f"{directory} has no {METADATA_FILE}: not a complete megatron-hybrid checkpoint "
            "(a save that did not finish, or another tool's directory)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointCorruptError(f"{path} is not valid JSON: {error}") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{path} describes format {meta.get('format')!r} version "
            f"{meta.get('format_version')}; this version reads {FORMAT!r} up to version "
            f"{FORMAT_VERSION}")
    return meta


def resolve_checkpoint_dir(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """An `iter_*` directory from a save directory (its latest, or `iteration`) or the
    `iter_*` directory itself. Raises CheckpointNotFoundError saying what was looked for."""
    path = Path(path)
    if (path / METADATA_FILE).is_file() and iteration is None:
        return path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
    if iteration is None:
        latest = path / LATEST_FILE
        if not latest.is_file():
            raise CheckpointNotFoundError(
                f"{path} holds no {LATEST_FILE} and is not an iter_* checkpoint directory")
        text = latest.read_text().strip()
        if not text.isdigit():
            raise CheckpointCorruptError(f"{latest} should hold an iteration number, found "
                                         f"{text[:40]!r}")
        iteration = int(text)
    directory = path / iteration_dir_name(iteration)
    if not directory.is_dir():
        raise CheckpointNotFoundError(
            f"{directory} does not exist; complete checkpoints in {path}: "
            f"{[d.name for d in complete_iterations(path)] or 'none'}")
    return directory


def complete_iterations(save_dir: Path) -> list[Path]:
    """`iter_*` directories with their checkpoint.json, oldest first."""
    found = []
    for entry in save_dir.iterdir() if save_dir.is_dir() else ():
        match = _ITER_DIR.match(entry.name)
        if match and (entry / METADATA_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def prune(save_dir: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (never the one `latest` names)
    and leftover `.partial` directories of saves that died. Returns what was removed."""
    removed = []
    latest_name = None
    if (save_dir / LATEST_FILE).is_file():
        text = (save_dir / LATEST_FILE).read_text().strip()
        latest_name = iteration_dir_name(int(text)) if text.isdigit() else None
    complete = complete_iterations(save_dir)
    for entry in complete[: max(len(complete) - keep_last, 0)]:
        if entry.name != latest_name:
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def remove_stale_partials(save_dir: Path) -> None:
    for entry in save_dir.glob(".iter_*.partial"):
        shutil.rmtree(entry, ignore_errors=True)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc
