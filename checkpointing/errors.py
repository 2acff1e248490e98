"""Checkpoint errors: all ValueErrors (the user's input), each naming the file or keys at fault."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


class CheckpointCorruptError(CheckpointError):
    """A file of the checkpoint is missing, truncated or altered since it was written."""


class NonFiniteCheckpointError(CheckpointError):
    """The state to be saved holds NaN or inf: nothing was written, `latest` did not move."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model (or optimizer) it is loaded into."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=(), config_differences=()):
        self.missing, self.unexpected, self.mismatched = (
            list(missing),
            list(unexpected),
            list(mismatched),
        )
        lines = [f"the checkpoint does not fit {what}:"]
        if self.missing:
            lines.append(
                f"  missing in the checkpoint ({len(self.missing)}): " + listing(self.missing)
            )
        if self.unexpected:
            lines.append(
                f"  in the checkpoint but not in the model ({len(self.unexpected)}): "
                + listing(self.unexpected)
            )
        if self.mismatched:
            lines.append(
                f"  different shapes ({len(self.mismatched)}): "
                + listing(
                    f"{key} checkpoint {tuple(saved)} vs model {tuple(wanted)}"
                    for key, saved, wanted in self.mismatched
                )
            )
        if config_differences:
            lines.append(
                "  the checkpoint was saved with another model config:\n    "
                + "\n    ".join(config_differences)
            )
        lines.append(
            "  nothing was loaded. Load into a model built with the checkpoint's "
            "pattern and sizes (--use-checkpoint-args takes them from the checkpoint; "
            "`megatron-hybrid-convert inspect DIR` shows them)."
        )
        super().__init__("\n".join(lines))


def describe_error(error: BaseException) -> str:
    """`Type: first line of the message`, for an error quoted inside one of ours."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def listing(items, limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class PackedTensorNotFoundError(CheckpointError):
    """A tensor that tensor parallelism stores rank-major (marked packed) is not in the state
    dict under the name the checkpoint views look it up by, so it cannot be presented in its
    canonical order."""

    def __init__(self, what: str, missing: dict[str, list[str]]):
        self.missing = dict(missing)
        lines = [
            f"{len(missing)} packed tensor(s) not found in {what}; saved as they are they "
            "would be written in tensor parallelism's rank-major order (or loaded values "
            "put in the wrong rows), so nothing was saved or loaded:"
        ]
        for name, similar in missing.items():
            near = f"; {what} has {listing(similar, limit=4)}" if similar else ""
            lines.append(f"  {name}{near}")
        lines.append(
            "  megatron_hybrid/parallel/packed.py names a packed parameter by its module "
            "path without the wrapper modules listed in _WRAPPER_NAMES; a wrapper "
            "whose name torch's state dict leaves out must be listed there."
        )
        super().__init__("\n".join(lines))
