"""Checkpoints: canonical keys, DCP save/load, crash-safe commits, converters."""

if __name__ != "megatron_hybrid.checkpointing":  # the repository root is on sys.path
    from megatron_hybrid.shadowing import step_aside

    step_aside(__name__, __file__)
