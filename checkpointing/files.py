"""The on-disk layout of a checkpoint directory and the file operations that keep it crash-safe.

    SAVE_DIR/
      latest_checkpointed_iteration.txt     Megatron's name; written last, atomically
      iter_0000100/                         one complete checkpoint
        .metadata, __0_0.distcp, ...        torch.distributed.checkpoint files (.metadata: index)
        checkpoint.json                     iteration, model config, pattern, file manifest
      .iter_0000200.partial/                a save in progress (or killed): never loaded
      .iter_0000100.old/                    iter_0000100 set aside while it is saved again

A save writes into the `.partial` directory, records sizes and CRC32s of every file in
`checkpoint.json`, renames the directory to `iter_*` (atomic on one filesystem) and only then
rewrites the `latest` file (atomic replace). Saving an iteration that exists already (a
fine-tuning run saving into its own load directory) first renames the old copy aside and deletes
it last. A process killed at any point therefore leaves `latest` naming a complete checkpoint:
the previous one, or, for a re-save, the old or the new copy (`resolve_checkpoint_dir` finds an
old copy aside; `finish_interrupted_saves` puts it back and clears what a killed save left).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader, Metadata

from megatron_hybrid.checkpointing.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    describe_error,
)

LATEST_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "checkpoint.json"
TENSOR_INDEX_FILE = ".metadata"  # DCP's index of the tensors and where their bytes are
FORMAT = "megatron-hybrid/canonical-dcp"
FORMAT_VERSION = 1
# What every checkpoint.json of this format holds, with its JSON type.
REQUIRED_FIELDS = {
    "iteration": int,
    "pattern": str,
    "contents": list,
    "model_config": dict,
    "files": dict,
}
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_SET_ASIDE_DIR = re.compile(r"^\.(iter_\d{7,})\.old$")
_JSON_TYPES = {
    dict: "object",
    list: "list",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def partial_dir(save_dir: Path, iteration: int) -> Path:
    return save_dir / f".{iteration_dir_name(iteration)}.partial"


def set_aside_dir(save_dir: Path, iteration: int) -> Path:
    return save_dir / f".{iteration_dir_name(iteration)}.old"


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
    written, or whose CRC32 differs. Without `checksums` only the tensor index (.metadata) is
    CRC-checked: it is small, every read depends on it, and a flipped byte in it fails in the
    unpickler in a dozen ways (or asks it for gigabytes) that name no file."""
    for name, expected in manifest.items():
        verify_file(directory / name, expected, checksum=checksums or name == TENSOR_INDEX_FILE)


def verify_file(path: Path, expected: dict, checksum: bool = True) -> None:
    """`path` against its manifest entry {size, crc32} (see verify_manifest)."""
    if not path.is_file():
        raise CheckpointCorruptError(f"checkpoint file {path} is missing")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CheckpointCorruptError(
            f"checkpoint file {path} is {size} bytes, but {expected['size']} were written: "
            "the file is truncated or was replaced; load an earlier iteration instead"
        )
    if checksum and _crc32(path) != expected["crc32"]:
        raise CheckpointCorruptError(
            f"checkpoint file {path} fails its CRC32 check (expected {expected['crc32']:08x}): "
            "its contents changed after the save; load an earlier iteration instead"
        )


def read_checkpoint_metadata(directory: Path) -> dict:
    """checkpoint.json of `directory`, checked to hold every field of REQUIRED_FIELDS with its
    type (CheckpointCorruptError naming the file and the field otherwise)."""
    path = directory / METADATA_FILE
    if not path.is_file():
        from megatron_hybrid.checkpointing.megatron_core.directory import METADATA_FILE as MCORE

        if (directory / MCORE).is_file():
            raise CheckpointCorruptError(
                f"{directory} is a Megatron-Core checkpoint ({MCORE}, no {METADATA_FILE}): load "
                "it with --load, or convert it with `megatron-hybrid-convert from-megatron`"
            )
        raise CheckpointCorruptError(
            f"{directory} has no {METADATA_FILE}: not a complete megatron-hybrid checkpoint "
            "(a save that did not finish, or another tool's directory)"
        )
    try:
        meta = json.loads(path.read_bytes())
    except ValueError as error:  # bad JSON, or bytes that are not UTF-8
        raise CheckpointCorruptError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise CheckpointCorruptError(
            f"{path} should hold a JSON object with the fields {', '.join(REQUIRED_FIELDS)}, "
            f"found a JSON {_json_type(meta)}"
        )
    if (
        meta.get("format") != FORMAT
        or not isinstance(meta.get("format_version"), int)
        or meta["format_version"] > FORMAT_VERSION
    ):
        raise CheckpointCorruptError(
            f"{path} describes format {meta.get('format')!r} version "
            f"{meta.get('format_version')}; this version reads {FORMAT!r} up to version "
            f"{FORMAT_VERSION}"
        )
    for name, kind in REQUIRED_FIELDS.items():
        if name not in meta:
            raise CheckpointCorruptError(
                f"{path} has no {name!r} field; a checkpoint.json of {FORMAT} holds "
                f"{', '.join(REQUIRED_FIELDS)}"
            )
        if _json_type(meta[name]) != _JSON_TYPES[kind]:
            raise CheckpointCorruptError(
                f"{path}: {name!r} should be a JSON {_JSON_TYPES[kind]}, "
                f"found a JSON {_json_type(meta[name])}"
            )
    _check_manifest_entries(path, meta["files"])
    return meta


def _check_manifest_entries(path: Path, manifest: dict) -> None:
    if TENSOR_INDEX_FILE not in manifest:
        raise CheckpointCorruptError(
            f"{path}: 'files' does not list {TENSOR_INDEX_FILE}, which every save writes"
        )
    for name, entry in manifest.items():
        if not (
            isinstance(entry, dict)
            and _json_type(entry.get("size")) == "number"
            and _json_type(entry.get("crc32")) == "number"
        ):
            raise CheckpointCorruptError(
                f"{path}: the 'files' entry of {name!r} should be {{\"size\": bytes, "
                f'"crc32": checksum}}, found {json.dumps(entry)[:80]}'
            )


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_tensor_index(directory: Path) -> Metadata:
    """DCP's index of the checkpoint's tensors (the .metadata file). Check the file against its
    manifest first (verify_manifest): this names the file, not which byte changed."""
    try:
        return FileSystemReader(str(directory)).read_metadata()
    except Exception as error:  # the unpickler's, whatever the bytes made it do
        raise CheckpointCorruptError(
            f"{directory / TENSOR_INDEX_FILE} cannot be read by this torch "
            f"({describe_error(error)}); it was written by an incompatible torch version, or "
            "changed after the save"
        ) from error


def read_latest_iteration(save_dir: Path) -> int | None:
    """The iteration the `latest` file names; None without one. CheckpointCorruptError when it
    holds anything but an iteration number in ASCII digits (what a save writes)."""
    latest = save_dir / LATEST_FILE
    if not latest.is_file():
        return None
    raw = latest.read_bytes()
    if not re.fullmatch(rb"[0-9]+", raw.strip()):
        raise CheckpointCorruptError(
            f"{latest} should hold an iteration number (ASCII digits, e.g. 100), found "
            f"{_shown(raw[:40])}; write the number of a complete checkpoint into it "
            f"({_listing(save_dir)}), or delete it to start from scratch"
        )
    return int(raw.strip())


def _shown(raw: bytes) -> str:
    """Text as Python would quote it; bytes that are not UTF-8 as a bytes literal."""
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def resolve_checkpoint_dir(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """An `iter_*` directory from a save directory (its latest, or `iteration`) or the
    `iter_*` directory itself. Raises CheckpointNotFoundError saying what was looked for, and
    CheckpointCorruptError when `latest` names a checkpoint that does not exist (training must
    then stop, not start from scratch)."""
    path = Path(path)
    if (path / METADATA_FILE).is_file() and iteration is None:
        return path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
    named_by_latest = iteration is None
    if named_by_latest:
        iteration = read_latest_iteration(path)
        if iteration is None:
            raise CheckpointNotFoundError(
                f"{path} holds no {LATEST_FILE} and is not an iter_* checkpoint directory"
            )
    directory = path / iteration_dir_name(iteration)
    if directory.is_dir():
        return directory
    set_aside = set_aside_dir(path, iteration)
    if (set_aside / METADATA_FILE).is_file():  # a re-save of it was killed before its commit
        return set_aside
    if named_by_latest:
        raise CheckpointCorruptError(
            f"{path / LATEST_FILE} names iteration {iteration}, but {directory} does not exist "
            f"({_listing(path)}); load one of those by its iteration, or delete {LATEST_FILE} "
            "to start from scratch"
        )
    raise CheckpointNotFoundError(f"{directory} does not exist ({_listing(path)})")


def _listing(save_dir: Path) -> str:
    names = [d.name for d in complete_iterations(save_dir)]
    return f"complete checkpoints in {save_dir}: {names or 'none'}"


def complete_iterations(save_dir: Path) -> list[Path]:
    """`iter_*` directories with their checkpoint.json, oldest first."""
    found = []
    for entry in save_dir.iterdir() if save_dir.is_dir() else ():
        match = _ITER_DIR.match(entry.name)
        if match and (entry / METADATA_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def commit(save_dir: Path, partial: Path, iteration: int) -> Path:
    """Move a finished `.partial` directory (checkpoint.json written) into place as `iter_*` and
    point `latest` at it. An existing copy of the iteration is renamed aside first and deleted
    last, so that at every step `latest` names a complete directory (the module docstring)."""
    final = save_dir / iteration_dir_name(iteration)
    set_aside = set_aside_dir(save_dir, iteration)
    if final.exists():
        if set_aside.exists():  # left by an earlier interrupted re-save; `final` is complete
            shutil.rmtree(set_aside)
        os.replace(final, set_aside)
    os.replace(partial, final)
    write_text_atomically(save_dir / LATEST_FILE, f"{iteration}\n")
    if set_aside.exists():
        shutil.rmtree(set_aside)
    return final


def finish_interrupted_saves(save_dir: Path) -> list[str]:
    """Put `save_dir` back in order after a killed save: a copy set aside by a re-save whose
    replacement never arrived goes back in place; other set-aside copies, `.partial` directories
    and a half-written `latest` are deleted. Returns what was done, for the log."""
    done = []
    for entry in sorted(save_dir.glob(".iter_*.old")):
        match = _SET_ASIDE_DIR.match(entry.name)
        final = save_dir / match.group(1) if match else None
        if final is not None and not final.exists() and (entry / METADATA_FILE).is_file():
            os.replace(entry, final)
            done.append(f"restored {final.name} from {entry.name}")
        else:
            shutil.rmtree(entry)
            done.append(f"removed {entry.name}")
    for entry in sorted(save_dir.glob(".iter_*.partial")):
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed {entry.name}")
    half_written = save_dir / f"{LATEST_FILE}.tmp"
    if half_written.exists():
        half_written.unlink()
        done.append(f"removed {half_written.name}")
    return done


def prune(save_dir: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, never the one `latest` names
    (the save just committed). Returns what was removed."""
    latest = read_latest_iteration(save_dir)
    latest_name = iteration_dir_name(latest) if latest is not None else None
    complete = complete_iterations(save_dir)
    removed = []
    for entry in complete[: max(len(complete) - keep_last, 0)]:
        if entry.name != latest_name:
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc
