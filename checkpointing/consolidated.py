"""Whole-model canonical state outside training: read a checkpoint's model tensors without
building a model, write a model-only checkpoint, and one-file safetensors export/import.

A consolidated safetensors file holds canonical keys and, in its header metadata, the model
config and pattern, so it can be turned back into a checkpoint with no model flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_hybrid.checkpointing import files
from megatron_hybrid.checkpointing.errors import CheckpointCorruptError, CheckpointError
from megatron_hybrid.checkpointing.manager import Attachment, CheckpointSaver, load_dcp_state
from megatron_hybrid.config import ModelConfig

SAFETENSORS_FORMAT = "megatron-hybrid/canonical-safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_model_state(
    path: str | os.PathLike, iteration: int | None = None, verify_checksums: bool = True
) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """(canonical model tensors, ModelConfig, checkpoint.json) of a checkpoint, on CPU.
    A damaged or incomplete checkpoint raises CheckpointCorruptError naming the file."""
    directory = files.resolve_checkpoint_dir(path, iteration)
    meta = files.read_checkpoint_metadata(directory)
    files.verify_manifest(directory, meta["files"], checksums=verify_checksums)
    config = model_config_of(directory, meta)
    template = {}
    for key, info in files.read_tensor_index(directory).state_dict_metadata.items():
        if key.startswith("model.") and hasattr(info, "size"):
            template[key[len("model.") :]] = torch.empty(
                tuple(info.size), dtype=info.properties.dtype
            )
    load_dcp_state({"model": template}, directory, meta, checksums_verified=verify_checksums)
    return template, config, meta


def model_config_of(directory: Path, meta: dict) -> ModelConfig:
    """The ModelConfig a checkpoint's checkpoint.json (`meta`) records; CheckpointCorruptError
    when it is not one this version builds."""
    try:
        return ModelConfig(**meta["model_config"])
    except (TypeError, ValueError) as error:  # unknown fields, or values that do not fit
        raise CheckpointCorruptError(
            f"{directory / files.METADATA_FILE}: its model_config does not describe a model "
            f"this version builds: {error}"
        ) from error


def write_model_checkpoint(
    save_dir: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    iteration: int = 0,
    log=print,
    attachment: Attachment | None = None,
) -> Path:
    """A model-only checkpoint (loads with --load, or --finetune) from canonical tensors, with
    `attachment` (e.g. the tokenizer, `tokenizer_attachment`) if given.

    The tensors are loaded into a HybridModel of `config` first, so a state that does not fit
    the config fails here with the model's own key and shape check."""
    from megatron_hybrid.checkpointing.state import ModelState
    from megatron_hybrid.model import HybridModel

    with torch.device("meta"):
        model = HybridModel(config)
    model.to_empty(device="cpu")
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:  # keep a bf16 export bf16
        model.to(float_dtypes.pop())
    try:
        ModelState(model, config.pattern).load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"the tensors do not fit the model config: {error}") from error
    CheckpointSaver(save_dir, log=log, attachment=attachment).save(
        iteration, model, None, None, config
    )
    return Path(save_dir) / files.iteration_dir_name(iteration)


def save_safetensors(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    dtype: torch.dtype | None = None,
) -> None:
    from safetensors.torch import save_file

    tensors = {
        k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
        for k, v in state.items()
    }
    save_file(
        tensors,
        str(path),
        metadata={
            "format": SAFETENSORS_FORMAT,
            "pattern": config.hybrid_layer_pattern,
            "model_config": json.dumps(config.to_dict()),
        },
    )


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:
        raise CheckpointCorruptError(
            f"{path} is not a readable safetensors file: {error}"
        ) from error
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{path} was not written by megatron-hybrid (format {metadata.get('format')!r}, "
            f"expected {SAFETENSORS_FORMAT!r}); for a Hugging Face checkpoint use from-hf"
        )
    try:
        config = ModelConfig(**json.loads(metadata["model_config"]))
    except (KeyError, TypeError, ValueError) as error:  # missing, not JSON, or does not fit
        raise CheckpointCorruptError(
            f"{path}: its metadata has no model_config this version builds ({error!r}); a "
            "megatron-hybrid safetensors export stores one"
        ) from error
    return state, config
