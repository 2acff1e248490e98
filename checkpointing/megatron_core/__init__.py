"""Megatron-Core `torch_dist` checkpoints in and out, without Megatron-LM installed.

    directory.py   the files: find, index, common state, whole-tensor and raw-object reads, write
    unpickling.py  Megatron's pickles read with stand-ins for its classes (never `import megatron`)
    args.py        Megatron-LM's saved `args` <-> ModelConfig
    keys.py        which Megatron-Core key holds each tensor (from MixerSpec.megatron_core)
    load.py        `--load` / `--finetune --load` of a Megatron-Core checkpoint, `from-megatron`
    save.py        `to-megatron`

Megatron-Core's model keys are our canonical keys up to a few spellings (its key tables are in
each mixer's spec); see the README, "Coming from Megatron-LM".
"""

from megatron_hybrid.checkpointing.megatron_core.directory import find_checkpoint
from megatron_hybrid.checkpointing.megatron_core.load import (
    load_megatron_checkpoint,
    read_megatron_model_fields,
    read_megatron_state,
)
from megatron_hybrid.checkpointing.megatron_core.save import save_megatron_checkpoint

__all__ = [
    "find_checkpoint",
    "load_megatron_checkpoint",
    "read_megatron_model_fields",
    "read_megatron_state",
    "save_megatron_checkpoint",
]
