"""`to-megatron`: a canonical model state as a Megatron-Core `torch_dist` checkpoint, the
directory Megatron-LM's `--load` (`dist_checkpointing.load`, strict) accepts for the same model.

It holds every key a Megatron-Core model of the chosen layer spec ("local" or "te") requests:
its tensors under Megatron's names (keys.write_maps), one `_extra_state` object per module that
has one (None for local modules, TE's empty FP8 state for TE's), and the `common_state` with the
run's `args` (args.args_from_model_config), the iteration and the content metadata Megatron-LM's
loader reads. Tensors are chunked as `tensor_parallel` ranks would have saved them (equal blocks
along each tensor's tensor-parallel dim); the model loads at any tensor-parallel size, as DCP
reads any chunking. No optimizer or RNG state is written (their layout depends on Megatron-LM's
parameter groups and devices), and the args say so: load with `--finetune` or `--no-load-optim`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megatron_hybrid.canonical import locate, mtp_depth_tensor
from megatron_hybrid.checkpointing.errors import CheckpointError
from megatron_hybrid.checkpointing.key_mapping import to_theirs
from megatron_hybrid.checkpointing.megatron_core import keys
from megatron_hybrid.checkpointing.megatron_core.args import args_from_model_config
from megatron_hybrid.checkpointing.megatron_core.directory import (
    COMMON_STATE_KEY,
    object_key,
    object_payload,
    write_checkpoint,
)
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.specs import SPECS
from megatron_hybrid.specs.base import ColumnParallel, RowParallel, SplitRows

# What Megatron-LM records of how its sharded state dicts were built (checkpointing.py,
# _build_sharded_state_dict_metadata, without a distributed optimizer).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# TE modules without FP8 state save an empty uint8 tensor; Megatron's local linears None.
_EMPTY_EXTRA_STATE = {"local": lambda: None, "te": lambda: torch.empty(0, dtype=torch.uint8)}
_TP_DIM = {ColumnParallel: 0, SplitRows: 0, RowParallel: 1}
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")
# An MTP depth's eh_proj: a ColumnParallelLinear in Megatron-Core (multi_token_prediction.py),
# replicated here; only its saved chunks depend on that.
_COLUMN_PARALLEL_IN_DEPTH = "eh_proj.weight"


class ChunkedTensor(torch.Tensor):
    """A whole tensor that DCP saves as equal chunks along `dim` (torch's `_Checkpointable`
    protocol: the write items and the data of each chunk)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, dim: int, chunks: int):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype)

    def __init__(self, data: torch.Tensor, dim: int, chunks: int):
        self.data_ = data.contiguous()
        self.pieces = {}
        step = data.shape[dim] // chunks
        for j in range(chunks):
            offsets = [0] * data.dim()
            offsets[dim] = j * step
            self.pieces[torch.Size(offsets)] = data.narrow(dim, j * step, step).contiguous()

    def __create_write_items__(self, fqn: str, tensor: ChunkedTensor) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, offsets, i),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=piece.shape),
                    properties=TensorProperties.create_from_tensor(piece),
                    size=self.data_.shape,
                ),
            )
            for i, (offsets, piece) in enumerate(self.pieces.items())
        ]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.pieces[index.offset]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{cls.__name__} is a checkpoint view, not for computing")


def tensor_parallel_dim(key: str, config: ModelConfig) -> int | None:
    """The dim Megatron-Core splits our canonical tensor `key` along over tensor-parallel ranks
    (its spec's tensor-parallel plan); None: every rank holds it whole."""
    if key in _VOCAB_PARALLEL:
        return 0
    depth_tensor = mtp_depth_tensor(key)
    if depth_tensor is not None:
        return 0 if depth_tensor[1] == _COLUMN_PARALLEL_IN_DEPTH else None
    tensor = locate(key, config.pattern)
    if tensor is None or tensor.part == "norm":
        return None
    style = tensor.spec.tensor_parallel.parameters.get(tensor.name)
    return _TP_DIM.get(type(style))


def _chunked(tensor: torch.Tensor, dim: int | None, tensor_parallel: int) -> torch.Tensor:
    if dim is None or tensor_parallel == 1 or tensor.shape[dim] % tensor_parallel:
        return tensor.contiguous()
    return ChunkedTensor(tensor, dim, tensor_parallel)


def megatron_state(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    layer_spec: str,
    tensor_parallel: int = 1,
) -> dict[str, Any]:
    """The DCP entries (tensors and `_extra_state` objects) of canonical `state` as a
    Megatron-Core model of `layer_spec` saves them."""
    entries: dict[str, Any] = {}
    for placed in keys.write_maps(config, layer_spec):
        dim = tensor_parallel_dim(placed.ours[0], config)
        converted = to_theirs(state, [placed], config)
        for key, tensor in converted.items():
            entries[key] = _chunked(tensor, dim, tensor_parallel)
    for key, shards in keys.extra_state_keys(config, layer_spec):
        value = _EMPTY_EXTRA_STATE[layer_spec]
        if shards is None:
            entries[object_key(key)] = object_payload(value())
        for j in range(shards or 0):
            entries[object_key(key, (j,), (shards,))] = object_payload(value())
    return entries


def save_megatron_checkpoint(
    save_dir: str | Path,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    *,
    iteration: int,
    consumed_train_samples: int = 0,
    layer_spec: str = "te",
    tensor_parallel: int = 1,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write canonical `state` of `config` as Megatron-Core checkpoint `iteration` of
    `save_dir` (its latest). Raises CheckpointError for a layout that does not fit (a size the
    tensor-parallel size does not divide) and for an iteration directory that exists."""
    problems = _tensor_parallel_problems(config, tensor_parallel)
    if problems:
        raise CheckpointError(
            f"--tensor-parallel-size {tensor_parallel} does not fit the model: "
            + "; ".join(problems)
        )
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    entries = megatron_state(state, config, layer_spec, tensor_parallel)
    args = args_from_model_config(
        config,
        iteration=iteration,
        consumed_train_samples=consumed_train_samples,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=1,
    )
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": dict(CONTENT_METADATA),
    }
    entries[COMMON_STATE_KEY] = object_payload(common)
    save_dir = Path(save_dir)
    try:
        return write_checkpoint(save_dir, iteration, entries)
    except FileExistsError:
        raise CheckpointError(
            f"{save_dir} already holds iteration {iteration}; write into another directory "
            "(or pick another --iteration)"
        ) from None


def _tensor_parallel_problems(config: ModelConfig, tensor_parallel: int) -> list[str]:
    if tensor_parallel < 1:
        return [f"it must be at least 1, got {tensor_parallel}"]
    sizes = {"vocab_size (embedding rows)": config.vocab_size}
    if config.pattern.mtp_depths:
        sizes["hidden_size (rows of MTP's column-parallel eh_proj)"] = config.hidden_size
    for symbol in set("".join(config.pattern.blocks + config.pattern.mtp_blocks)):
        for field, flag in SPECS[symbol].tensor_parallel.divisible:
            sizes[f"{field} ({flag})"] = getattr(config, field)
    return [
        f"{name}={value} is not divisible by it"
        for name, value in sizes.items()
        if value is not None and math.gcd(value, tensor_parallel) != tensor_parallel
    ]
