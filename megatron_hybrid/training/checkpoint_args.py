"""`--use-checkpoint-args` (Megatron-LM's flag): the model is the one the checkpoint records, so
a resume or a fine-tune needs no model flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_hybrid.checkpointing import files
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.training.settings import Settings, default_model_value

KNOWN_FIELDS = {f.name for f in dataclasses.fields(ModelConfig) if f.init}


def with_checkpoint_model(settings: Settings) -> tuple[Settings, list[str]]:
    """`settings` with every model field taken from the checkpoint `--load` names (its latest
    iteration, or --ckpt-step), and one line per field that differs from the flags given (the
    checkpoint wins, as in Megatron-LM). Unchanged without --use-checkpoint-args."""
    checkpoint = settings.checkpoint
    if not checkpoint.use_checkpoint_args:
        return settings, []
    if not checkpoint.load:
        raise ValueError("--use-checkpoint-args needs --load DIR (the checkpoint to read)")
    directory, saved = _saved_model_config(checkpoint.load, checkpoint.ckpt_step)
    fields = dict(settings.model.config_fields)
    from_flags = settings.model.resolved_fields()  # what the flags alone would build
    notes = []
    for name, value in saved.items():
        if name == "vocab_size":  # the tokenizer's, padded: checked when the weights load
            continue
        if name not in KNOWN_FIELDS:
            raise ValueError(
                f"{directory} records model field {name!r}, which this version does not know: "
                "load it with the version that saved it, or give the model flags instead of "
                "--use-checkpoint-args"
            )
        current = from_flags.get(name, default_model_value(name))
        if current != value:
            notes.append(f"{name}: {current!r} -> {value!r} (from {directory.name})")
        fields[name] = value
    model = dataclasses.replace(settings.model, config_fields=fields)
    return dataclasses.replace(settings, model=model), notes


def _saved_model_config(load: str, iteration: int | None) -> tuple[Path, dict]:
    """(checkpoint directory, the model config fields it records): ours records them all, a
    Megatron-Core checkpoint those its saved args hold."""
    from megatron_hybrid.checkpointing import megatron_core

    megatron = megatron_core.find_checkpoint(load, iteration)
    if megatron is not None:  # the fields its args hold; the flags give the rest
        return megatron, megatron_core.read_megatron_model_fields(megatron)
    directory = files.resolve_checkpoint_dir(load, iteration)
    return directory, files.read_checkpoint_metadata(directory)["model_config"]
