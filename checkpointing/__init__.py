"""Checkpoints: canonical keys, DCP save/load, crash-safe commits, converters."""

import warnings

# A single-process run (or a converter reading every tensor itself) is a supported layout, not
# something to warn about at every save and load.
warnings.filterwarnings(
    "ignore",
    message="torch.distributed is disabled, unavailable or "
    "uninitialized, assuming the intent is to (save|load) in a single process",
)

if __name__ != "megatron_hybrid.checkpointing":  # the repository root is on sys.path
    from megatron_hybrid.shadowing import step_aside

    step_aside(__name__, __file__)
