"""An independent writer of Megatron-Core `torch_dist` checkpoints, for the tests.

Megatron-Core (Python 3.12+) cannot be installed here, so the tests build its checkpoints with
this writer, written from the format as Megatron-LM documents and implements it, and sharing no
code with megatron_hybrid.checkpointing.megatron_core (it imports none of it):

- megatron/core/dist_checkpointing/serialization.py: `save` writes the tensors and objects
  through the torch_dist strategy, then `metadata.json` ({"sharded_backend": "torch_dist",
  "sharded_backend_version": 1}); the common (non-tensor) state is the ShardedObject
  `common_state` (shape (1,), offset (0,)); before 0.18.2 it was `common.pt`.
- strategies/torch.py: a ShardedTensor is one global DCP tensor under its key, each rank's
  piece a chunk at its global offsets; a ShardedObject is a bytes item under
  `{key}/shard_{offsets}_{shape}` holding `torch.save([object])`, unaltered.
- megatron/training/checkpointing.py: `latest_checkpointed_iteration.txt`, `iter_{:07d}`; the
  common state holds `args` (the run's Namespace, which refers to Megatron's enums),
  `checkpoint_version` 3.0, `iteration`, the optimizer's non-tensor state; the RNG states are
  the ShardedObject `rng_state` of shape (pp, tp).
- megatron/core/ssm/mamba_mixer.py: in_proj saved as `.z .x .B .C .dt`, conv1d weight and bias
  as `.x .B .C`. megatron/core/models/hybrid/hybrid_layer_specs.py: TE's layer spec fuses the
  pre-norms into the next linear (`layer_norm_weight`), except the MoE layer's. moe/experts.py:
  experts as one [E, ...] tensor under `experts.experts.`, or, with singleton local shards, one
  per expert under `experts.experts.{e}.` (`local_experts.{e}.` is SequentialMLP's module name).
  `_extra_state`: every Megatron linear (None for local modules, TE's FP8 state for TE's), TE's
  norms; per expert along the expert axis.
- transformer/multi_latent_attention.py, mla_qk_norm_config.py, experimental_attention_variant/
  dsa.py: MLA ('+') and DSA ('D') layers save input_layernorm apart in every spec; with
  --qk-layernorm TE's MLA fuses the latent norms into the up-projections
  (`linear_q_up_proj.layer_norm_weight`, `linear_kv_up_proj.layer_norm_weight`), DSA keeps
  `q_layernorm`/`kv_layernorm`; the indexer under `self_attention.core_attention.indexer.`. TE's
  hybrid spec: TELinear down-projections and indexer linears, TENorm input_layernorm, latent norms
  and k_norm; local: ColumnParallelLinear down-projections for MLA (GPT's local spec), ModelOpt's
  torch Linear (no _extra_state) for DSA's down-projections and indexer (its hybrid local spec).
- transformer/multi_token_prediction.py, models/hybrid/hybrid_model.py: each MTP depth d
  (the pattern's '/' parts) under `mtp.layers.{d}.`: `enorm`, `hnorm`, `final_layernorm` (TENorm
  in TE's spec, ModelOpt's Norm, without _extra_state, in the local one) and the column-parallel
  `eh_proj`; its layers, numbered from 0, under `mtp.layers.{d}.mtp_model_layer.layers.{j}.`,
  spelled as the decoder's (the same hybrid layer spec builds them).
  dist_checkpointing/optimizer.py and
  optimizer/optimizer.py: Adam's moments as `optimizer.state.{exp_avg,exp_avg_sq}.<model key>`,
  the step as `common_step` in the common state.

The writer starts from canonical tensors of ours (a model's weights), re-spelled by its own rules.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import io
import json
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


@dataclasses.dataclass(frozen=True)
class Variant:
    """Which spelling of the format a checkpoint uses."""

    layer_spec: str = "te"  # "te": norms fused into the next linear; "local": separate
    in_proj: str = "split"  # "split" (.z .x .B .C .dt) or "packed"
    experts: str = "grouped"  # "grouped", "per_expert" (experts.experts.{e}), "local_experts"
    tp: int = 1  # tensor-parallel ranks that saved it (chunks, args, rng_state)
    # Pipeline stages that saved it: each saves its layers under their global index (the keys
    # do not change), the args and the RNG states (one per stage) do.
    pp: int = 1
    common: str = "object"  # "object" (common_state in DCP) or "file" (common.pt)
    fp8: bool = False  # TE _extra_state with a delayed-scaling history

    def __str__(self) -> str:
        return "-".join(str(v) for v in dataclasses.astuple(self))


# -- fake Megatron classes, pickled into args as Megatron's own are ------------------------------
_FAKE_MODULES = {}


def _fake_module(name: str) -> types.ModuleType:
    """A module of that name, its parent packages made too (an import needs them)."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        _FAKE_MODULES.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    return _FAKE_MODULES[name]


class ModelType(enum.Enum):
    encoder_or_decoder = 1


class AttnBackend(enum.Enum):
    auto = 5


@dataclasses.dataclass
class OptimizerConfig:
    optimizer: str = "adam"
    lr: float = 1e-3


for _cls, _module in (
    (ModelType, "megatron.core.enums"),
    (AttnBackend, "megatron.core.transformer.enums"),
    (OptimizerConfig, "megatron.core.optimizer.optimizer_config"),
):
    _cls.__module__ = _module
    setattr(_fake_module(_module), _cls.__name__, _cls)


@contextlib.contextmanager
def megatron_classes_importable():
    """While pickling: Megatron's module names resolve to the fakes (pickle checks that a
    class is importable under its name). Afterwards nothing of "megatron" is importable."""
    sys.modules.update(_FAKE_MODULES)
    try:
        yield
    finally:
        for name in _FAKE_MODULES:
            sys.modules.pop(name, None)


# -- key spelling ----------------------------------------------------------------------------------
# A layer's prefix (the decoder's, or an MTP depth's `mtp_model_layer`'s) and its tensor's name.
_LAYER = re.compile(r"^((?:decoder|mtp\.layers\.\d+\.mtp_model_layer)\.layers\.\d+\.)(.+)$")


def megatron_tensors(canonical: dict, config, variant: Variant) -> dict[str, torch.Tensor]:
    """Canonical tensors of ours -> the model tensors of a Megatron-Core checkpoint."""
    moe_layers = _layers_with(canonical, "mlp.router.weight")
    gdn_layers = _layers_with(canonical, "self_attention.in_proj.weight")
    latent_layers = _layers_with(canonical, "self_attention.linear_kv_down_proj.weight")
    dsa_layers = _layers_with(canonical, _INDEXER + "linear_wk.weight")
    out = {}
    for key, tensor in canonical.items():
        match = _LAYER.match(key)
        if match is None:
            out[key] = tensor
            continue
        layer = prefix = match.group(1)
        name = match.group(2)
        te = variant.layer_spec == "te"
        if te and name == "norm.weight":
            out[prefix + "mixer.in_proj.layer_norm_weight"] = tensor
        elif te and name == "input_layernorm.weight" and layer in gdn_layers:
            out[prefix + "self_attention.in_proj.layer_norm_weight"] = tensor
        elif name == "input_layernorm.weight" and layer in latent_layers:
            out[prefix + name] = tensor  # a norm of its own in every spec
        elif te and name in _LATENT_NORMS and layer not in dsa_layers:
            out[prefix + _LATENT_NORMS[name]] = tensor
        elif te and name == "input_layernorm.weight":
            out[prefix + "self_attention.linear_qkv.layer_norm_weight"] = tensor
        elif te and name == "pre_mlp_layernorm.weight" and layer not in moe_layers:
            out[prefix + "mlp.linear_fc1.layer_norm_weight"] = tensor
        elif name == "mixer.in_proj.weight" and variant.in_proj == "split":
            out.update(_split(prefix + name, tensor, "z x B C dt", _in_proj_rows(config)))
        elif name.startswith("mixer.conv1d.") and variant.in_proj == "split":
            out.update(_split(prefix + name, tensor, "x B C", _in_proj_rows(config)[1:4]))
        elif name == "self_attention.in_proj.weight" and variant.in_proj == "split":
            rows = _gdn_in_proj_rows(config)
            out.update(_split(prefix + name, tensor, "query key value z beta alpha", rows))
        elif name == "self_attention.conv1d.weight" and variant.in_proj == "split":
            rows = _gdn_in_proj_rows(config)[:3]
            out.update(_split(prefix + name, tensor, "query key value", rows))
        elif name.startswith("mlp.experts.linear_fc"):
            fc = name[len("mlp.experts.") :]
            if variant.experts == "grouped":
                out[f"{prefix}mlp.experts.experts.{fc}"] = tensor
            else:
                where = "experts" if variant.experts == "per_expert" else "local_experts"
                for e in range(tensor.shape[0]):
                    out[f"{prefix}mlp.experts.{where}.{e}.{fc}"] = tensor[e].clone()
        else:
            out[prefix + name] = tensor
    return out


_INDEXER = "self_attention.core_attention.indexer."
_INDEXER_LINEARS = ("linear_wq_b", "linear_wk", "linear_weights_proj")
# TE's MLA: each latent norm fused into the up-projection after it.
_LATENT_NORMS = {
    "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
}


def _layers_with(canonical: dict, name: str) -> set[str]:
    """The layers (by prefix) that hold tensor `name` (which kind of layer a layer is)."""
    return {m.group(1) for k in canonical if (m := _LAYER.match(k)) and m.group(2) == name}


def _gdn_in_proj_rows(config) -> list[int]:
    """Gated DeltaNet's in_proj parts query, key, value, z, beta, alpha (gated_delta_net.py)."""
    qk = config.linear_num_key_heads * config.linear_key_head_dim
    v = config.linear_num_value_heads * config.linear_value_head_dim
    heads = config.linear_num_value_heads
    return [qk, qk, v, v, heads, heads]


def _in_proj_rows(config) -> list[int]:
    d = config.mamba_num_heads * config.mamba_head_dim
    gn = config.mamba_num_groups * config.mamba_state_dim
    return [d, d, gn, gn, config.mamba_num_heads]


def _split(key: str, tensor: torch.Tensor, parts: str, rows: list[int]) -> dict:
    return dict(zip((f"{key}.{p}" for p in parts.split()), torch.split(tensor, rows), strict=True))


def extra_state_keys(canonical: dict, config, variant: Variant) -> list[str]:
    """DCP keys of the `_extra_state` objects of a model of the variant's layer spec."""
    te = variant.layer_spec == "te"
    # HybridStack's final norm is a TENorm in every layer spec (hybrid_block.py).
    keys = ["output_layer._extra_state/shard_0_1", "decoder.final_norm._extra_state/shard_0_1"]
    linears = {
        "mixer.in_proj.weight": "mixer.in_proj",
        "mixer.out_proj.weight": "mixer.out_proj",
        "self_attention.linear_qkv.weight": "self_attention.linear_qkv",
        "self_attention.linear_proj.weight": "self_attention.linear_proj",
        "mlp.linear_fc1.weight": "mlp.linear_fc1",
        "mlp.linear_fc2.weight": "mlp.linear_fc2",
        "mlp.shared_experts.linear_fc1.weight": "mlp.shared_experts.linear_fc1",
        "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.linear_fc2",
        "self_attention.in_proj.weight": "self_attention.in_proj",  # Gated DeltaNet
        "self_attention.out_proj.weight": "self_attention.out_proj",
        "mlp.fc1_latent_proj.weight": "mlp.fc1_latent_proj",  # TELinear in every spec
        "mlp.fc2_latent_proj.weight": "mlp.fc2_latent_proj",
        "self_attention.linear_q_proj.weight": "self_attention.linear_q_proj",  # MLA, DSA
        "self_attention.linear_q_up_proj.weight": "self_attention.linear_q_up_proj",
        "self_attention.linear_kv_up_proj.weight": "self_attention.linear_kv_up_proj",
    }
    # Linears that DSA's local spec builds as ModelOpt's torch Linear, without an _extra_state.
    torch_linears_in_local_dsa = {
        "self_attention.linear_q_down_proj.weight": "self_attention.linear_q_down_proj",
        "self_attention.linear_kv_down_proj.weight": "self_attention.linear_kv_down_proj",
        **{f"{_INDEXER}{m}.weight": f"{_INDEXER}{m}" for m in _INDEXER_LINEARS},
    }
    dsa_layers = _layers_with(canonical, _INDEXER + "linear_wk.weight")
    latent_layers = _layers_with(canonical, "self_attention.linear_kv_down_proj.weight")
    for key in canonical:
        keys += _mtp_depth_extra_state(key, te)
        match = _LAYER.match(key)
        if match is None:
            continue
        layer = prefix = match.group(1)
        name = match.group(2)
        te_norm = te and name.endswith("norm.weight") and layer in latent_layers
        if name in linears:
            keys.append(f"{prefix}{linears[name]}._extra_state/shard_0_1")
        elif name in torch_linears_in_local_dsa and (te or layer not in dsa_layers):
            keys.append(f"{prefix}{torch_linears_in_local_dsa[name]}._extra_state/shard_0_1")
        elif name in _LATENT_NORMS and layer in dsa_layers:
            # Standalone; the QK-norm resolver picks TENorm under the default --transformer-impl
            # in either spec.
            keys.append(f"{prefix}{name.removesuffix('.weight')}._extra_state/shard_0_1")
        elif te_norm and name not in _LATENT_NORMS:  # input_layernorm, the indexer's k_norm
            keys.append(f"{prefix}{name.removesuffix('.weight')}._extra_state/shard_0_1")
        elif name.startswith("mlp.experts.linear_fc"):
            module = name[len("mlp.experts.") : -len(".weight")]
            n = config.num_moe_experts
            keys += [
                f"{prefix}mlp.experts.experts.{module}._extra_state/shard_{e}_{n}" for e in range(n)
            ]
        elif (
            te and name == "pre_mlp_layernorm.weight" and f"{prefix}mlp.router.weight" in canonical
        ):
            keys.append(f"{prefix}pre_mlp_layernorm._extra_state/shard_0_1")
        elif te and name == "self_attention.out_norm.weight":  # Gated DeltaNet's TENorm
            keys.append(f"{prefix}self_attention.out_norm._extra_state/shard_0_1")
    return keys


_MTP_DEPTH_MODULE = re.compile(
    r"^(mtp\.layers\.\d+\.)(enorm|hnorm|eh_proj|final_layernorm)\.weight$"
)


def _mtp_depth_extra_state(key: str, te: bool) -> list[str]:
    """An MTP depth's own modules: eh_proj is a Megatron linear in both specs, the norms are
    TENorms in TE's spec only."""
    match = _MTP_DEPTH_MODULE.match(key)
    if match is None or (match.group(2) != "eh_proj" and not te):
        return []
    return [f"{match.group(1)}{match.group(2)}._extra_state/shard_0_1"]


# -- DCP writing ---------------------------------------------------------------------------------
class _TensorParallelChunks(torch.Tensor):
    """A global tensor saved as `tp` chunks along `dim`, as `tp` ranks would."""

    @staticmethod
    def __new__(cls, tensor, dim, tp):
        return torch.Tensor._make_wrapper_subclass(cls, tensor.shape, dtype=tensor.dtype)

    def __init__(self, tensor, dim, tp):
        size = tensor.shape[dim] // tp
        self.global_shape = tensor.shape
        self.chunks = []
        for r in range(tp):
            offsets = [0] * tensor.dim()
            offsets[dim] = r * size
            self.chunks.append((torch.Size(offsets), tensor.narrow(dim, r * size, size).clone()))

    def __create_write_items__(self, fqn, tensor):
        return [
            WriteItem(
                index=MetadataIndex(fqn, offsets, i),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=chunk.shape),
                    properties=TensorProperties.create_from_tensor(chunk),
                    size=self.global_shape,
                ),
            )
            for i, (offsets, chunk) in enumerate(self.chunks)
        ]

    def __get_tensor_shard__(self, index):
        return dict(self.chunks)[index.offset]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError


class _AsIsBytesPlanner(DefaultSavePlanner):
    """Megatron's MCoreSavePlanner: bytes items are written as given."""

    def transform_object(self, write_item, object):
        return object


def _saved(value) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save([value], buffer)
    buffer.seek(0)
    return buffer


_ROW_PARALLEL = ("linear_proj.weight", "out_proj.weight", "linear_fc2.weight")
_COLUMN_PARALLEL = re.compile(
    r"(word_embeddings\.weight|output_layer\.weight|linear_qkv\.weight|linear_fc1\.weight"
    r"|linear_q_proj\.weight|eh_proj\.weight|linear_q_up_proj\.weight|linear_kv_up_proj\.weight"
    r"|in_proj\.weight(\.\w+)?|conv1d\.(weight|bias)(\.\w+)?|mixer\.(A_log|D|dt_bias|norm\.weight))$"
)


def _tp_dim(key: str) -> int | None:
    """The dim tensor-parallel ranks split a Megatron key along (None: whole on every rank;
    experts are left whole, as with expert parallelism alone)."""
    if "experts.experts" in key or "local_experts" in key:
        return None
    if key.endswith(_ROW_PARALLEL):
        return 1
    return 0 if _COLUMN_PARALLEL.search(key) else None


def _local_mla_down_projections(canonical: dict, variant: Variant) -> set[str]:
    """MLA's down-projections where GPT's local spec builds them column-parallel (TE's spec:
    replicated TELinear; DSA's local spec: replicated torch Linear)."""
    if variant.layer_spec != "local":
        return set()
    dsa_layers = _layers_with(canonical, _INDEXER + "linear_wk.weight")
    down = ("self_attention.linear_q_down_proj.weight", "self_attention.linear_kv_down_proj.weight")
    return {
        key
        for key in canonical
        if (m := _LAYER.match(key)) and m.group(2) in down and m.group(1) not in dsa_layers
    }


def write_megatron_checkpoint(
    save_dir: Path,
    canonical: dict,
    config,
    variant: Variant,
    *,
    iteration: int = 3,
    consumed_train_samples: int = 0,
    moments: dict | None = None,
    extra_tensors: dict | None = None,
    optimizer_objects: dict | None = None,
    args_overrides: dict | None = None,
) -> Path:
    """Write `canonical` (our tensors of `config`) as Megatron-Core checkpoint `iteration` of
    `save_dir`, spelled as `variant` says. `moments`: {canonical key: (exp_avg, exp_avg_sq)} to
    save as Megatron's per-parameter optimizer state; `extra_tensors` / `optimizer_objects`:
    more entries (a key this version does not know, a distributed optimizer's buffers)."""
    entries: dict = {}
    column_parallel_down = _local_mla_down_projections(canonical, variant)
    for key, tensor in megatron_tensors(canonical, config, variant).items():
        dim = 0 if key in column_parallel_down else _tp_dim(key)
        tensor = tensor.contiguous()
        if variant.tp > 1 and dim is not None and tensor.shape[dim] % variant.tp == 0:
            entries[key] = _TensorParallelChunks(tensor, dim, variant.tp)
        else:
            entries[key] = tensor
    for key in extra_state_keys(canonical, config, variant):
        entries[key] = _saved(_extra_state_payload(variant, key))
    for stage in range(variant.pp):  # one RNG state per (pipeline, tensor-parallel) rank
        for r in range(variant.tp):
            rng = {
                "random_rng_state": ("x", 1),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
            }
            entries[f"rng_state/shard_{stage}.{r}_{variant.pp}.{variant.tp}"] = _saved([rng])
    common = {
        "args": _args(config, variant, iteration, consumed_train_samples, args_overrides or {}),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
    }
    if moments is not None:
        moment_state = {
            "exp_avg": {k: v[0] for k, v in moments.items()},
            "exp_avg_sq": {k: v[1] for k, v in moments.items()},
        }
        for moment, values in moment_state.items():
            for key, tensor in megatron_tensors(values, config, variant).items():
                entries[f"optimizer.state.{moment}.{key}"] = tensor.contiguous()
        common["optimizer"] = {
            "state": {"common_step": iteration},
            "param_groups": [{"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}],
        }
        common["opt_param_scheduler"] = {"max_lr": 1e-2, "num_steps": iteration}
    entries.update(extra_tensors or {})
    entries.update({k: _saved(v) for k, v in (optimizer_objects or {}).items()})
    directory = save_dir / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    with megatron_classes_importable():
        if variant.common == "object":
            entries["common_state/shard_0_1"] = _saved(common)
        else:
            torch.save(common, directory / "common.pt")
    dcp.save(
        entries,
        storage_writer=dcp.FileSystemWriter(str(directory)),
        planner=_AsIsBytesPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
        no_dist=True,
    )
    (directory / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    (save_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return directory


def _extra_state_payload(variant: Variant, key: str):
    if variant.layer_spec == "local":
        return None  # Megatron's ColumnParallelLinear.get_extra_state
    if variant.fp8 and ".mixer.in_proj." in key:
        # TE's delayed-scaling state: a pickled dict in a uint8 tensor.
        state = {"forward": {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3)}}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8)


def _or_default(value, default):
    return default if value is None else value


def _args(config, variant: Variant, iteration, consumed, overrides) -> argparse.Namespace:
    main = "|".join(
        "".join(stage) for stage in config.pattern.stages
    )  # Megatron's pattern: no fusion groups
    depths = config.pattern.mtp_depths  # each MTP depth a '/' part, as Megatron-LM saves it
    args = argparse.Namespace(
        hybrid_layer_pattern=main + ("/" + "".join(config.pattern.mtp_blocks)) * depths,
        num_layers=len(main.replace("|", "")),
        mtp_num_layers=depths or None,
        mtp_loss_scaling_factor=config.mtp_loss_scaling_factor,
        mtp_use_repeated_layer=False,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        group_query_attention="+" not in main and "D" not in main,  # MLA refuses it
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        position_embedding_type=config.position_embedding_type,
        rotary_base=int(config.rotary_base),
        rotary_percent=1.0,
        mamba_state_dim=config.mamba_state_dim,
        mamba_head_dim=config.mamba_head_dim,
        mamba_num_groups=config.mamba_num_groups,
        mamba_num_heads=config.mamba_num_heads,
        num_experts=config.num_moe_experts,
        moe_router_topk=config.moe_router_topk,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
        moe_router_score_function=config.moe_router_score_function,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=config.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=config.moe_router_bias_update_rate,
        moe_router_load_balancing_type="aux_loss",
        moe_router_num_groups=config.moe_router_num_groups,
        moe_router_group_topk=config.moe_router_group_topk,
        moe_latent_size=config.moe_latent_size,
        linear_conv_kernel_dim=config.linear_conv_kernel_dim,
        linear_key_head_dim=config.linear_key_head_dim,
        linear_value_head_dim=config.linear_value_head_dim,
        linear_num_key_heads=config.linear_num_key_heads,
        linear_num_value_heads=config.linear_num_value_heads,
        experimental_attention_variant="dsa" if "D" in main else ("gdn" if "G" in main else None),
        # MLA and DSA (Megatron-LM sets multi_latent_attention for a pattern with '+' or 'D';
        # its MLA flags have defaults, held whatever the model).
        multi_latent_attention="+" in main or "D" in main,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=_or_default(config.kv_lora_rank, 32),
        qk_head_dim=_or_default(config.qk_head_dim, 128),
        qk_pos_emb_head_dim=_or_default(config.qk_pos_emb_head_dim, 64),
        v_head_dim=_or_default(config.v_head_dim, 128),
        rope_type=config.rope_type,
        rotary_scaling_factor=config.rotary_scaling_factor,
        mscale=config.mscale,
        mscale_all_dim=config.mscale_all_dim,
        mla_down_proj_fusion=False,
        dsa_indexer_n_heads=config.dsa_indexer_n_heads,
        dsa_indexer_head_dim=config.dsa_indexer_head_dim,
        dsa_indexer_topk=config.dsa_indexer_topk,
        dsa_indexer_loss_coeff=config.dsa_indexer_loss_coeff if "D" in main else None,
        dsa_indexer_use_sparse_loss=config.dsa_indexer_use_sparse_loss,
        dsa_indexer_topk_freq=1,
        dsa_indexer_rope_interleaved=False,
        dsa_indexer_scoring_relu=True,
        dsa_indexer_k_norm_epsilon=None,
        moe_aux_loss_coeff=config.moe_aux_loss_coeff,
        moe_grouped_gemm=variant.experts == "grouped",
        layernorm_epsilon=config.layernorm_epsilon,
        init_method_std=config.init_method_std,
        untie_embeddings_and_output_weights=config.untie_embeddings_and_output_weights,
        padded_vocab_size=config.vocab_size,
        swiglu=config.activation == "swiglu",
        squared_relu=config.activation == "squared_relu",
        normalization="RMSNorm",
        add_bias_linear=False,
        qk_layernorm=config.qk_layernorm,
        tensor_model_parallel_size=variant.tp,
        pipeline_model_parallel_size=variant.pp,
        consumed_train_samples=consumed,
        lr=1e-2,
        min_lr=1e-3,
        lr_warmup_iters=2,
        lr_decay_style="cosine",
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        # What Megatron's args hold of its own classes: the reader must cope without them.
        model_type=ModelType.encoder_or_decoder,
        attention_backend=AttnBackend.auto,
        optimizer_config=OptimizerConfig(),
    )
    for name, value in overrides.items():
        setattr(args, name, value)
    return args
