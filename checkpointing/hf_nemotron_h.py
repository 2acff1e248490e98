"""Conversion between canonical checkpoints and Hugging Face transformers' `nemotron_h` format.

Pure functions on state dicts plus file I/O; transformers itself is never imported (the files
written here load with `transformers.NemotronHForCausalLM.from_pretrained(directory)` and no code
of ours; `safetensors` is needed only for the file functions).

    hf_config_from_model_config(config) -> dict          config.json content
    model_config_from_hf_config(hf) -> ModelConfig        its inverse
    canonical_to_hf(state, config) -> dict                canonical keys -> HF on-disk keys
    hf_to_canonical(hf_state, config) -> dict             the exact inverse
    save_hf_checkpoint(directory, state, config, dtype=None, max_shard_size=None)
    load_hf_checkpoint(directory, hybrid_layer_pattern=None)
        -> (state, config)

Key mapping, canonical layer i = HF layer i (HF has no fusion: `[M-]` is two HF layers). Each
layer's keys are its spec's `hf_nemotron_h` table (megatron_hybrid/specs/), applied in both
directions by checkpointing/key_mapping.py; the rest is here:

    embedding.word_embeddings.weight               backbone.embeddings.weight
    decoder.final_norm.weight                      backbone.norm_f.weight
    output_layer.weight (embedding when tied)      lm_head.weight (HF never ties)
    M  decoder.layers.i.norm.weight                backbone.layers.i.norm.weight
       decoder.layers.i.mixer.{in_proj.weight, conv1d.weight, conv1d.bias, A_log, D, dt_bias,
                               norm.weight, out_proj.weight}   -> backbone.layers.i.mixer.<same>
    *  decoder.layers.i.input_layernorm.weight     backbone.layers.i.norm.weight
       ...self_attention.linear_qkv.weight         ...mixer.{q,k,v}_proj.weight (regrouped)
       ...self_attention.linear_proj.weight        ...mixer.o_proj.weight
    -  decoder.layers.i.pre_mlp_layernorm.weight   backbone.layers.i.norm.weight
       ...mlp.linear_fc1.weight / linear_fc2       ...mixer.up_proj.weight / down_proj.weight
    E  ...pre_mlp_layernorm.weight                 backbone.layers.i.norm.weight
       ...mlp.router.weight                        ...mixer.gate.weight
       ...mlp.router.expert_bias (zeros if none)   ...mixer.gate.e_score_correction_bias
       ...mlp.experts.linear_fc1.weight [E, F, H]  ...mixer.experts.{j}.up_proj.weight [F, H]
       ...mlp.experts.linear_fc2.weight [E, H, F]  ...mixer.experts.{j}.down_proj.weight [H, F]
       ...mlp.shared_experts.linear_fc1/fc2        ...mixer.shared_experts.up_proj/down_proj
       ...mlp.fc{1,2}_latent_proj.weight (latent)  ...mixer.fc{1,2}_latent_proj.weight

`linear_qkv` holds Megatron's grouped rows (per query group: its q heads, then k, then v); HF
keeps q, k and v apart, query head h reading key/value head h // (heads / groups), as ours does.

Math that HF's `nemotron_h` (transformers 5.x) cannot express makes `hf_config_from_model_config`
(and every export) raise `HFExportError` listing each setting and what would be valid: rotary
embeddings, SwiGLU, softmax routing, MoE without a shared expert or with one expert, layer
symbols other than M * - E. The other way, `HFImportError` lists HF settings our model does not
implement. Multi-token-prediction depths (the pattern's '/' parts) are dropped with a warning:
nemotron_h's forward runs none, and the export writes no `mtp.*` tensors (imports skip them).

Group-limited routing: HF's `n_group` / `topk_group` are our `moe_router_num_groups` /
`moe_router_group_topk`, but the groups are ranked differently. Megatron (and so ours) scores a
group by the sum of its top (topk // group_topk) choice values; transformers' nemotron_h by the
sum of its top 2 (sigmoid scores plus `e_score_correction_bias`, as ours with sigmoid routing).
The two choose the same groups exactly when topk // group_topk == 2 (DeepSeek-V3's 8 of 4
groups), or when every group is kept (`topk_group >= n_group`: no restriction, written as
n_group = topk_group = 1). For any other setting export and import raise, naming both rules,
rather than change which experts a token uses (`group_routing_problem`).

Mamba's dt clamp needs care, as transformers versions disagree on which config field sets it:
5.15 to 5.24 clamp dt = softplus(dt + dt_bias) to (`time_step_min`, inf) and ignore
`time_step_limit`; 5.5 to 5.10 and 5.25 clamp to `time_step_limit`, both bounds (`time_step_min`
is then only dt_bias's initialization range). Megatron does not clamp. Ours clamps to
(`mamba_dt_floor`, `mamba_dt_ceiling`), so:
- exports write the clamp in both fields, `time_step_min = max(floor, NO_DT_FLOOR)` (the
  smallest normal float32 is a no-op clamp that keeps HF's log-uniform init finite) and
  `time_step_limit = [floor, ceiling or inf]`, which every version reads alike, except that 5.15
  to 5.24 drop a ceiling: with one of those installed, a ceiling is an HFExportError.
- imports read the clamp the installed transformers applies (`hf_dt_clamp_field`); where the
  two fields agree the version does not matter. Without transformers the newest known reading
  (`time_step_limit`) is used; a version of unknown behaviour with fields that disagree is an
  HFImportError.

config.json also carries our full `ModelConfig.to_dict()` under the key `megatron_hybrid`, so an
import restores what HF has no field for (fusion groups and pipeline stages of the pattern,
tied embeddings, expert-bias balancing, initialization and training-only settings).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from megatron_hybrid.checkpointing.key_mapping import (
    KeyMappingError,
    PlacedKeyMap,
    layer_key_maps,
    model_shapes,
    to_ours,
    to_theirs,
)
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.pattern import SYMBOL_NAMES, HybridPattern, parse_hybrid_pattern
from megatron_hybrid.specs import SPECS
from megatron_hybrid.specs.base import unchanged

__all__ = [
    "HFConversionError",
    "HFExportError",
    "HFImportError",
    "NO_DT_FLOOR",
    "canonical_shapes",
    "canonical_to_hf",
    "export_problems",
    "hf_dt_clamp_field",
    "hf_config_from_model_config",
    "hf_to_canonical",
    "installed_transformers_version",
    "load_hf_checkpoint",
    "model_config_from_hf_config",
    "save_hf_checkpoint",
]

HF_MODEL_TYPE = "nemotron_h"
HF_ARCHITECTURE = "NemotronHForCausalLM"
EXTRA_KEY = "megatron_hybrid"  # our ModelConfig.to_dict() inside config.json
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# A dt floor below every normal float32 is a no-op for our math (read as no floor).
NO_DT_FLOOR = float(torch.finfo(torch.float32).tiny)
# The config field whose clamp transformers' nemotron_h applies to Mamba's dt, by (major, minor)
# release from `first` up to, not including, `end` (None: every later release, assumed to keep
# the newest behaviour). Releases in no range (before 5.5, 5.11 to 5.14) are of unknown behaviour.
_DT_CLAMP_FIELD_BY_VERSION = (
    ((5, 5), (5, 11), "time_step_limit"),
    ((5, 15), (5, 25), "time_step_min"),  # Zamba2's mixer: (time_step_min, inf)
    ((5, 25), None, "time_step_limit"),
)

# nemotron_h's layer type of each symbol that has one (the specs' `hf_nemotron_h` layouts).
LAYER_TYPES = {
    symbol: spec.hf_nemotron_h.layer_type
    for symbol, spec in SPECS.items()
    if spec.hf_nemotron_h is not None
}
_SYMBOL_OF_TYPE = {v: k for k, v in LAYER_TYPES.items()}


class HFConversionError(ValueError):
    """A model, config or file that cannot be converted to or from HF's nemotron_h."""


class HFExportError(HFConversionError):
    """Our config uses settings that HF's nemotron_h cannot express."""


class HFImportError(HFConversionError):
    """An HF config or checkpoint that our model cannot reproduce, or a malformed one."""


# -- Mamba's dt clamp -----------------------------------------------------------------------------
def installed_transformers_version() -> str | None:
    """The installed transformers' version (read without importing it), None if not installed."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_dt_clamp_field(version: str | None) -> str | None:
    """The config field, "time_step_min" or "time_step_limit", whose clamp transformers `version`
    applies to nemotron_h's dt; None where that is not known. For no transformers (None), the
    newest known behaviour."""
    if version is None:
        return _DT_CLAMP_FIELD_BY_VERSION[-1][2]
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return None
    release = (int(match.group(1)), int(match.group(2)))
    for first, end, field in _DT_CLAMP_FIELD_BY_VERSION:
        if first <= release and (end is None or release < end):
            return field
    return None


def _as_floor(low: float) -> float:
    return float(low) if low > NO_DT_FLOOR else 0.0


def _dt_clamp_when_applying(field: str, hf: Mapping) -> tuple[float, float | None]:
    """Our (mamba_dt_floor, mamba_dt_ceiling) for an HF config whose reader clamps with `field`
    (NemotronHConfig's defaults where a field is missing)."""
    if field == "time_step_min":
        return _as_floor(hf.get("time_step_min", 0.001)), None
    limit = hf.get("time_step_limit", (0.0, math.inf))
    numbers = (
        isinstance(limit, (list, tuple))
        and len(limit) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)
    )
    if not (numbers and limit[0] <= limit[1]):
        raise HFImportError(
            f"HF config time_step_limit={limit!r}: expected [low, high], two "
            "numbers with low <= high (high may be infinite)"
        )
    low, high = limit
    return _as_floor(low), None if high == math.inf else float(high)


def _imported_dt_clamp(hf: Mapping) -> tuple[float, float | None]:
    """(mamba_dt_floor, mamba_dt_ceiling) that computes what the installed transformers does."""
    by_min = _dt_clamp_when_applying("time_step_min", hf)
    by_limit = _dt_clamp_when_applying("time_step_limit", hf)
    if by_min == by_limit:
        return by_min
    version = installed_transformers_version()
    field = hf_dt_clamp_field(version)
    if field is None:
        raise HFImportError(
            f"HF config time_step_min={hf.get('time_step_min', 0.001)!r} and time_step_limit="
            f"{hf.get('time_step_limit', (0.0, math.inf))!r} clamp Mamba's dt differently "
            f"(transformers 5.15 to 5.24 apply the first, 5.25 the second), and which one the "
            f"installed transformers {version} applies is not known; install transformers 5.15 "
            "to 5.25, or edit config.json so that time_step_limit is [time_step_min, inf]"
        )
    return by_min if field == "time_step_min" else by_limit


def _dt_clamp_export_problem(config: ModelConfig) -> str | None:
    if config.mamba_dt_ceiling is None:
        return None
    version = installed_transformers_version()
    field = hf_dt_clamp_field(version)
    if field == "time_step_limit":
        return None
    why = (
        "clamps dt to (time_step_min, inf) and ignores time_step_limit"
        if field
        else "may ignore time_step_limit (its nemotron_h's dt clamp is not known)"
    )
    return (
        f"mamba_dt_ceiling={config.mamba_dt_ceiling}: the installed transformers {version} "
        f"{why}, so it would not apply the ceiling; valid: no ceiling (mamba_dt_ceiling=None)"
        ", or transformers >= 5.25, which applies time_step_limit"
    )


def _hf_dt_clamp_fields(config: ModelConfig) -> dict:
    """Our clamp in both of HF's fields, so that every transformers version applies it."""
    floor, ceiling = config.mamba_dt_limit
    return {"time_step_min": max(floor, NO_DT_FLOOR), "time_step_limit": [floor, ceiling]}


def _imported_dt_init_min(hf: Mapping, extra: Mapping) -> float | None:
    """mamba_dt_min (dt_bias's init range) from HF's time_step_min, None to keep the recorded or
    default one: our exports write the dt floor there and record mamba_dt_min in `extra`."""
    time_step_min = hf.get("time_step_min", 0.001)
    written_by_us = "mamba_dt_min" in extra and time_step_min == max(
        extra.get("mamba_dt_floor", 0.0), NO_DT_FLOOR
    )
    return time_step_min if time_step_min > NO_DT_FLOOR and not written_by_us else None


# -- config ---------------------------------------------------------------------------------------
def _symbols(config: ModelConfig) -> str:
    """The main decoder's canonical layer symbols, in order (fusion and stages dropped)."""
    return "".join(config.pattern.blocks)


def export_problems(config: ModelConfig) -> list[str]:
    """Every setting of `config` that HF's nemotron_h cannot express (empty: exportable)."""
    problems = []
    symbols = _symbols(config)
    clamp_problem = _dt_clamp_export_problem(config) if "M" in symbols else None
    if clamp_problem:
        problems.append(clamp_problem)
    unsupported = sorted({s for s in symbols if s not in LAYER_TYPES})
    for s in unsupported:
        problems.append(
            f"layer symbol {s!r} ({SYMBOL_NAMES[s]}) in hybrid_layer_pattern="
            f"{config.hybrid_layer_pattern!r}: nemotron_h has only "
            f"{', '.join(f'{t} ({SYMBOL_NAMES[t]})' for t in LAYER_TYPES)} layers"
        )
    if "*" in symbols and config.position_embedding_type != "none":
        problems.append(
            f"position_embedding_type={config.position_embedding_type!r}: nemotron_h attention "
            "has no position embedding; valid: 'none' (flag: --position-embedding-type none)"
        )
    if ("-" in symbols or "E" in symbols) and config.activation != "squared_relu":
        problems.append(
            f"activation={config.activation!r}: nemotron_h MLPs and experts are non-gated "
            "squared ReLU (mlp_hidden_act 'relu2'); valid: 'squared_relu' (flag: --squared-relu)"
        )
    if "E" in symbols:
        if config.moe_router_score_function != "sigmoid":
            problems.append(
                f"moe_router_score_function={config.moe_router_score_function!r}: nemotron_h "
                "routes with sigmoid scores; valid: 'sigmoid' (flag: "
                "--moe-router-score-function sigmoid)"
            )
        if config.moe_shared_expert_intermediate_size is None:
            problems.append(
                "moe_shared_expert_intermediate_size=None: every nemotron_h MoE layer has a "
                "shared expert; set a positive width (flag: "
                "--moe-shared-expert-intermediate-size N)"
            )
        if config.num_moe_experts < 2:
            problems.append(
                f"num_moe_experts={config.num_moe_experts}: nemotron_h's router scores expert "
                "groups by their top-2 experts; valid: 2 or more experts (flag: --num-experts)"
            )
        groups = config.moe_router_num_groups
        group_problem = group_routing_problem(
            config.moe_router_topk, groups or 1, config.moe_router_group_topk or 1
        )
        if group_problem:
            problems.append(
                f"moe_router_num_groups={groups}, moe_router_group_topk="
                f"{config.moe_router_group_topk} with moe_router_topk={config.moe_router_topk}: "
                f"{group_problem}"
            )
    return problems


def group_routing_problem(topk: int, num_groups: int, group_topk: int) -> str | None:
    """Why transformers' nemotron_h would route a group-limited top-`topk` over `num_groups`
    groups, `group_topk` kept per token, differently from Megatron's rule (module docstring);
    None where the two agree."""
    per_group = topk // group_topk
    if group_topk >= num_groups or per_group == 2:
        return None
    return (
        "transformers' nemotron_h ranks groups by the sum of their top 2 expert scores (with "
        f"e_score_correction_bias), Megatron's group-limited routing by the sum of their top "
        f"topk // group_topk = {per_group}, so the two would send tokens to different experts; "
        f"valid: topk // group_topk = 2 (topk {2 * group_topk} to {3 * group_topk - 1} for "
        f"{group_topk} group(s) per token), every group kept, or no groups"
    )


def _require_exportable(config: ModelConfig) -> None:
    problems = export_problems(config)
    if problems:
        raise HFExportError(
            f"cannot export to Hugging Face {HF_MODEL_TYPE} ({len(problems)} unsupported "
            "setting(s)):\n  - " + "\n  - ".join(problems)
        )


def hf_config_from_model_config(config: ModelConfig) -> dict:
    """The config.json content of `config` as a `NemotronHForCausalLM` (raises HFExportError)."""
    _require_exportable(config)
    symbols = _symbols(config)
    hf: dict = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "layers_block_type": [LAYER_TYPES[s] for s in symbols],
        # Older readers (NVIDIA's remote code, transformers < 5) use these two.
        "hybrid_override_pattern": symbols,
        "num_hidden_layers": len(symbols),
        "tie_word_embeddings": False,  # HF never ties; lm_head holds a copy when we do
        "layer_norm_epsilon": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
        "intermediate_size": config.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "use_bias": False,
        "residual_in_fp32": False,
        "num_nextn_predict_layers": 0,
    }
    if "M" in symbols:
        hf.update(
            mamba_num_heads=config.mamba_num_heads,
            mamba_head_dim=config.mamba_head_dim,
            n_groups=config.mamba_num_groups,
            ssm_state_size=config.mamba_state_dim,
            conv_kernel=config.mamba_conv_kernel,
            chunk_size=config.mamba_chunk_size,
            use_conv_bias=True,
            mamba_hidden_act="silu",
            **_hf_dt_clamp_fields(config),
            time_step_max=config.mamba_dt_max,
            time_step_floor=config.mamba_dt_init_floor,
        )
        if config.mamba_d_inner % config.hidden_size == 0:
            hf["expand"] = config.mamba_d_inner // config.hidden_size  # informational in HF
    if "*" in symbols:
        hf.update(
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_query_groups,
            head_dim=config.kv_channels,
            attention_bias=False,
        )
    if "E" in symbols:
        scale = config.moe_router_topk_scaling_factor
        hf.update(
            n_routed_experts=config.num_moe_experts,
            num_experts_per_tok=config.moe_router_topk,
            moe_intermediate_size=config.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
            moe_latent_size=config.moe_latent_size,
            **_hf_group_fields(config),
            # Ours renormalizes sigmoid top-k weights iff k > 1 (a single weight stays raw).
            norm_topk_prob=config.moe_router_topk > 1,
            routed_scaling_factor=1.0 if scale is None else float(scale),
        )
    # The record describes the exported model: without the MTP depths it drops.
    main_pattern = str(HybridPattern(config.pattern.stages))
    hf[EXTRA_KEY] = {
        **config.to_dict(),
        "hybrid_layer_pattern": main_pattern,
        "mtp_num_layers": None,
    }
    return hf


def _hf_group_fields(config: ModelConfig) -> dict:
    """n_group and topk_group; routing that keeps every group is HF's no-group 1 and 1 (its
    group step would need 2 experts per group)."""
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is None or group_topk >= groups:
        return {"n_group": 1, "topk_group": 1}
    return {"n_group": groups, "topk_group": group_topk}


def _imported_groups(hf: Mapping, extra: Mapping) -> tuple[int | None, int | None]:
    """(moe_router_num_groups, moe_router_group_topk) of an HF config whose group routing
    `_import_problems` accepted. Where every group is kept (no restriction), no groups, or the
    recorded groups that keep every group likewise."""
    n_group, topk_group = hf.get("n_group", 1), hf.get("topk_group", 1)
    if topk_group < n_group:
        return n_group, topk_group
    recorded = (extra.get("moe_router_num_groups"), extra.get("moe_router_group_topk"))
    if recorded[0] is not None and recorded[1] is not None and recorded[1] >= recorded[0]:
        return recorded
    return None, None


def _hf_layer_types(hf: Mapping) -> list[str]:
    types = hf.get("layers_block_type")
    if types is None:
        pattern = hf.get("hybrid_override_pattern")
        if not isinstance(pattern, str):
            raise HFImportError(
                "HF config has neither 'layers_block_type' (a list of layer types) nor "
                "'hybrid_override_pattern' (a string such as 'M-M*-'): cannot tell the layers"
            )
        unknown = sorted(set(pattern) - set(LAYER_TYPES))
        if unknown:
            raise HFImportError(
                f"HF config hybrid_override_pattern={pattern!r} has unknown symbol(s) "
                f"{unknown}; valid: {' '.join(LAYER_TYPES)}"
            )
        return [LAYER_TYPES[s] for s in pattern]
    if not isinstance(types, list) or not all(t in _SYMBOL_OF_TYPE for t in types):
        raise HFImportError(
            f"HF config layers_block_type={types!r}: expected a list of "
            f"{', '.join(repr(t) for t in _SYMBOL_OF_TYPE)}"
        )
    if not types:
        raise HFImportError("HF config layers_block_type is empty: a model needs layers")
    return list(types)


def _import_problems(hf: Mapping, symbols: str) -> list[str]:
    problems = []

    def need(field: str, default, valid, why: str) -> None:
        value = hf.get(field, default)
        if value not in valid:
            shown = " or ".join(repr(v) for v in valid)
            problems.append(f"{field}={value!r}: {why}; supported: {shown}")

    need("use_bias", False, (False,), "Mamba in_proj/out_proj biases are not implemented")
    if "M" in symbols:
        need("mamba_hidden_act", "silu", ("silu",), "our Mamba2 conv activation is SiLU")
    if "-" in symbols or "E" in symbols:
        need("mlp_hidden_act", "relu2", ("relu2",), "our MLPs and experts use squared ReLU")
        need("mlp_bias", False, (False,), "MLP biases are not implemented")
    if "*" in symbols:
        need("sliding_window", None, (None,), "sliding-window attention is not implemented")
    if "E" in symbols:
        topk = hf.get("num_experts_per_tok", 2)
        n_group, topk_group = hf.get("n_group", 1), hf.get("topk_group", 1)
        group_problem = group_routing_problem(topk, n_group, topk_group)
        if group_problem:
            problems.append(
                f"n_group={n_group}, topk_group={topk_group} with num_experts_per_tok={topk}: "
                f"{group_problem}"
            )
        norm = hf.get("norm_topk_prob", True)
        if norm != (topk > 1):
            problems.append(
                f"norm_topk_prob={norm!r} with num_experts_per_tok={topk}: our sigmoid router "
                "renormalizes the top-k weights exactly when k > 1; supported: "
                f"norm_topk_prob={topk > 1}"
            )
    return problems


def model_config_from_hf_config(
    hf: Mapping, *, hybrid_layer_pattern: str | None = None
) -> ModelConfig:
    """Our ModelConfig for an HF nemotron_h config (a config.json dict).

    `hybrid_layer_pattern` picks a layout (fusion groups, pipeline stages) for the same layers,
    e.g. "[M-][*E]" for HF's "M-*E"; by default the pattern recorded by our export, else the
    unfused symbols. Raises HFImportError for HF settings our model does not implement."""
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise HFImportError(
            f"HF config model_type={hf.get('model_type')!r}: expected {HF_MODEL_TYPE!r}"
        )
    hf = _decode_floats(_resolve_aliases(hf))
    symbols = "".join(_SYMBOL_OF_TYPE[t] for t in _hf_layer_types(hf))
    problems = _import_problems(hf, symbols)
    if problems:
        raise HFImportError(
            f"cannot import this Hugging Face {HF_MODEL_TYPE} config ({len(problems)} "
            "unsupported setting(s)):\n  - " + "\n  - ".join(problems)
        )
    if hf.get("num_nextn_predict_layers", 0):
        warnings.warn(
            f"HF config has num_nextn_predict_layers={hf['num_nextn_predict_layers']}: "
            "multi-token-prediction layers are not imported (HF's forward does not run them "
            "either)",
            stacklevel=2,
        )

    init_fields = {f.name for f in dataclasses.fields(ModelConfig) if f.init}
    extra = hf.get(EXTRA_KEY)
    extra = {k: v for k, v in extra.items() if k in init_fields} if isinstance(extra, dict) else {}
    fields: dict = {
        "vocab_size": hf.get("vocab_size", 131072),  # NemotronHConfig's defaults throughout
        "hidden_size": hf.get("hidden_size", 4096),
        "layernorm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        "init_method_std": hf.get("initializer_range", 0.02),
        "ffn_hidden_size": hf.get("intermediate_size", 21504),
        "activation": "squared_relu",
        "position_embedding_type": "none",
        # HF always has an lm_head of its own; a tied export records it in `extra`.
        "untie_embeddings_and_output_weights": extra.get(
            "untie_embeddings_and_output_weights", True
        ),
    }
    if "M" in symbols:
        fields.update(
            mamba_num_heads=hf.get("mamba_num_heads", 128),
            mamba_head_dim=hf.get("mamba_head_dim", 64),
            mamba_num_groups=hf.get("n_groups", 8),
            mamba_state_dim=hf.get("ssm_state_size", 128),
            mamba_conv_kernel=hf.get("conv_kernel", 4),
            mamba_chunk_size=hf.get("chunk_size", 128),
            mamba_dt_max=hf.get("time_step_max", 0.1),
            mamba_dt_init_floor=hf.get("time_step_floor", 1e-4),
        )
        fields["mamba_dt_floor"], fields["mamba_dt_ceiling"] = _imported_dt_clamp(hf)
        init_min = _imported_dt_init_min(hf, extra)
        if init_min is not None:
            fields["mamba_dt_min"] = init_min
    if "*" in symbols:
        heads = hf.get("num_attention_heads", 32)
        fields.update(
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads", 8) or heads,
            kv_channels=hf.get("head_dim", 128) or fields["hidden_size"] // heads,
        )
    if "E" in symbols:
        scale = float(hf.get("routed_scaling_factor", 1.0))
        recorded_scale = extra.get("moe_router_topk_scaling_factor")
        fields.update(
            num_moe_experts=hf.get("n_routed_experts", 8),
            moe_router_topk=hf.get("num_experts_per_tok", 2),
            moe_ffn_hidden_size=hf.get("moe_intermediate_size", 7688),
            moe_shared_expert_intermediate_size=hf.get("moe_shared_expert_intermediate_size", 7688),
            moe_router_score_function="sigmoid",
            # HF always has e_score_correction_bias; without `extra` keep it.
            moe_router_enable_expert_bias=extra.get("moe_router_enable_expert_bias", True),
            # A factor of 1.0 is recorded as None or 1.0 (the same math); HF's value wins.
            moe_router_topk_scaling_factor=(
                scale if scale != 1.0 else 1.0 if recorded_scale == 1.0 else None
            ),
            moe_latent_size=hf.get("moe_latent_size"),
        )
        fields["moe_router_num_groups"], fields["moe_router_group_topk"] = _imported_groups(
            hf, extra
        )

    pattern = hybrid_layer_pattern
    if pattern is None:
        recorded = extra.get("hybrid_layer_pattern")
        pattern = recorded if _same_layers(recorded, symbols) else symbols
    elif not _same_layers(pattern, symbols):
        raise HFImportError(
            f"hybrid_layer_pattern={pattern!r} does not describe the HF model's layers "
            f"{symbols!r}: only fusion groups '[XY]' and stage separators '|' may be added"
        )
    fields["hybrid_layer_pattern"] = pattern
    return ModelConfig(**{**extra, **fields})


# Older field names that NemotronHConfig still accepts (its __post_init__ and attribute_map).
_HF_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "layer_types": "layers_block_type",
}


def _resolve_aliases(hf: Mapping) -> dict:
    out = dict(hf)
    for old, new in _HF_ALIASES.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def _same_layers(pattern, symbols: str) -> bool:
    if not isinstance(pattern, str):
        return False
    try:
        parsed = parse_hybrid_pattern(pattern)
    except ValueError:
        return False
    return not parsed.mtp_depths and "".join(parsed.blocks) == symbols


# -- tensors --------------------------------------------------------------------------------------
# Outside the decoder layers (lm_head, tied or not, is handled apart); each layer's tensors map
# by its spec's `hf_nemotron_h` layout, canonical layer i to HF layer i.
_MODEL_KEY_MAPS = (
    PlacedKeyMap(
        ("embedding.word_embeddings.weight",), ("backbone.embeddings.weight",), unchanged, unchanged
    ),
    PlacedKeyMap(("decoder.final_norm.weight",), ("backbone.norm_f.weight",), unchanged, unchanged),
)
_HF_LAYERS = "backbone.layers."


def _layer_key_maps(config: ModelConfig) -> list[PlacedKeyMap]:
    return layer_key_maps(config, lambda spec: spec.hf_nemotron_h, _HF_LAYERS)


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical key of an exportable `config` and its shape (the model is built on the
    meta device: no memory, no initialization)."""
    _require_exportable(config)
    return model_shapes(config)


def _hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF key (on-disk names) of an exportable `config` and its shape."""
    meta = {k: torch.empty(shape, device="meta") for k, shape in canonical_shapes(config).items()}
    return {k: tuple(t.shape) for k, t in _to_hf(meta, config).items()}


def _check_state(
    state: Mapping,
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    error: type[HFConversionError],
) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} has {tuple(state[k].shape)}, expected {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        lines = [f"{what} does not fit the model config:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mismatched),
        ):
            if items:
                shown = ", ".join(items[:12]) + (
                    f", ... ({len(items) - 12} more)" if len(items) > 12 else ""
                )
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise error("\n".join(lines))


def canonical_to_hf(
    state: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Canonical state dict -> HF nemotron_h state dict with on-disk key names (`backbone.*`,
    per-expert tensors, `lm_head.weight` always present). Tensors keep their dtype; most are
    returned as views of the inputs. Raises HFExportError for unsupported configs or a state that
    does not fit `config` (naming the keys). MTP depths (`mtp.*`) are dropped with a warning."""
    _check_state(state, canonical_shapes(config), "canonical state", HFExportError)
    if config.pattern.mtp_depths:
        warnings.warn(
            f"hybrid_layer_pattern={config.hybrid_layer_pattern!r} has "
            f"{config.pattern.mtp_depths} multi-token-prediction depth(s), which Hugging Face "
            f"{HF_MODEL_TYPE} does not run: its mtp.* tensors are not exported",
            stacklevel=2,
        )
    return _to_hf(state, config)


def _to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = to_theirs(state, _MODEL_KEY_MAPS, config)
    out["lm_head.weight"] = (
        state["output_layer.weight"]
        if config.untie_embeddings_and_output_weights
        else state["embedding.word_embeddings.weight"]
    )
    out.update(to_theirs(state, _layer_key_maps(config), config))
    return out


def hf_to_canonical(
    hf_state: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """HF nemotron_h state dict (on-disk names, per-expert tensors) -> canonical state dict; the
    exact inverse of `canonical_to_hf`. With tied embeddings `lm_head.weight` must equal the
    embedding, and without expert bias `e_score_correction_bias` must be zero (else the HF model
    computes something `config` cannot): HFImportError otherwise, as for missing, unexpected or
    misshapen keys."""
    return _hf_to_canonical(hf_state, config, "HF state")


def _hf_to_canonical(
    hf_state: Mapping[str, torch.Tensor], config: ModelConfig, source: str
) -> dict[str, torch.Tensor]:
    try:
        expected = _hf_shapes(config)
    except HFExportError as e:
        raise HFImportError(
            f"{source}: the model config cannot hold a nemotron_h model: {e}"
        ) from None
    _check_state(hf_state, expected, source, HFImportError)
    out = to_ours(hf_state, _MODEL_KEY_MAPS, config)
    embedding, lm_head = hf_state["backbone.embeddings.weight"], hf_state["lm_head.weight"]
    if config.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = lm_head
    elif not torch.equal(lm_head, embedding):
        raise HFImportError(
            f"{source}: lm_head.weight differs from backbone.embeddings.weight but the config "
            "ties them (untie_embeddings_and_output_weights=False); import with untied "
            "embeddings"
        )
    try:
        out.update(to_ours(hf_state, _layer_key_maps(config), config))
    except KeyMappingError as e:
        raise HFImportError(f"{source}: {e}") from None
    return out


# -- files ----------------------------------------------------------------------------------------
def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "Hugging Face checkpoint files need the 'safetensors' package: pip install safetensors"
        ) from None
    return safetensors.torch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_hf_checkpoint(
    directory: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    dtype: torch.dtype | None = None,
    max_shard_size: int | None = None,
) -> Path:
    """Write `state` (canonical keys) as a Hugging Face nemotron_h checkpoint: config.json and
    model.safetensors, or `model-0000k-of-0000n.safetensors` shards plus
    model.safetensors.index.json when `max_shard_size` (bytes) is given and exceeded.

    `dtype` casts the weights (e_score_correction_bias stays float32, as HF keeps it). Weight
    files of an earlier save in `directory` that this save does not rewrite are removed, so
    transformers never reads a stale mix. Returns the directory."""
    st = _safetensors()
    hf_config = hf_config_from_model_config(config)
    hf_state = canonical_to_hf(state, config)
    tensors = {}
    for key, tensor in hf_state.items():
        t = tensor.detach()
        if dtype is not None and not key.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        tensors[key] = t
    weight_dtype = dtype if dtype is not None else tensors["backbone.embeddings.weight"].dtype
    hf_config["dtype"] = _dtype_name(weight_dtype)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(tensors, max_shard_size)
    written = set()
    if len(shards) == 1:
        names = [WEIGHTS_FILE]
    else:
        names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    for name, keys in zip(names, shards, strict=True):
        # safetensors refuses tensors sharing storage (tied lm_head, expert slices): copy each.
        shard = {k: tensors[k].cpu().contiguous().clone() for k in keys}
        _atomic_write(
            directory / name,
            lambda path, shard=shard: st.save_file(shard, str(path), metadata={"format": "pt"}),
        )
        written.add(name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys},
        }
        _atomic_write(
            directory / INDEX_FILE,
            lambda path: path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"),
        )
        written.add(INDEX_FILE)
    for path in directory.iterdir():
        stale = path.name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_FILE.match(path.name)
        if stale and path.name not in written:
            path.unlink()
    _atomic_write(
        directory / CONFIG_FILE,
        lambda path: path.write_text(
            json.dumps(_encode_floats(hf_config), indent=2, sort_keys=True, allow_nan=False) + "\n"
        ),
    )
    return directory


def _plan_shards(
    tensors: Mapping[str, torch.Tensor], max_shard_size: int | None
) -> list[list[str]]:
    if max_shard_size is None:
        return [list(tensors)]
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    # safetensors creates its files owner-only (0600): give every file the mode a plain
    # open() would, so the weights are as readable as config.json beside them.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HFImportError(
            f"{path}: file not found (expected a Hugging Face {CONFIG_FILE} next to the weights)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFImportError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return _decode_floats(data)


def _encode_floats(value):
    """Infinities as transformers writes them ({"__float__": "Infinity"}): strict JSON."""
    if isinstance(value, float) and math.isinf(value):
        return {"__float__": "Infinity" if value > 0 else "-Infinity"}
    if isinstance(value, dict):
        return {k: _encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_floats(v) for v in value]
    return value


def _decode_floats(value):
    """transformers writes inf/nan as {"__float__": "Infinity"}; turn those back into floats."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_floats(v) for v in value]
    return value


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    st = _safetensors()
    index_path, single = directory / INDEX_FILE, directory / WEIGHTS_FILE
    if single.exists():
        files = [single]
        source = str(single)
    elif index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFImportError(f"{index_path}: expected a non-empty 'weight_map' object")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        source = f"{index_path} (+{len(files)} shards)"
    else:
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise HFImportError(
            f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (found: {found or 'nothing'}); "
            "only safetensors checkpoints are read"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.exists():
            raise HFImportError(f"{path}: shard listed in {INDEX_FILE} is missing")
        try:
            shard = st.load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise HFImportError(f"{path}: cannot read safetensors file ({e})") from None
        for key, tensor in shard.items():
            if key in state:
                raise HFImportError(f"{path}: tensor {key!r} appears in more than one shard")
            state[key] = tensor
    return state, source


def _normalize_hf_keys(
    raw: Mapping[str, torch.Tensor], hf_config: Mapping, config: ModelConfig, source: str
) -> dict[str, torch.Tensor]:
    """Accept what transformers writes (backbone.*, per-expert tensors) and its in-memory names
    (model.*, stacked experts.up_proj / down_proj); drop MTP tensors; add zero conv biases for
    use_conv_bias=False."""
    state: dict[str, torch.Tensor] = {}
    dropped = []
    for key, tensor in raw.items():
        if key.startswith("mtp."):
            dropped.append(key)
            continue
        if key.startswith("model."):
            key = "backbone." + key[len("model.") :]
        m = re.fullmatch(r"(backbone\.layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)", key)
        if m and tensor.dim() == 3:
            for j in range(tensor.shape[0]):
                state[f"{m.group(1)}.{j}.{m.group(2)}.weight"] = tensor[j]
            continue
        if key in state:
            raise HFImportError(
                f"{source}: tensor {key!r} appears twice (under backbone.* and model.* names)"
            )
        state[key] = tensor
    if dropped:
        warnings.warn(
            f"{source}: {len(dropped)} multi-token-prediction tensor(s) (mtp.*) were not imported",
            stacklevel=3,
        )
    if not _resolve_aliases(hf_config).get("use_conv_bias", True):
        for key, weight in list(state.items()):
            if key.endswith(".mixer.conv1d.weight"):
                state.setdefault(
                    key.removesuffix("weight") + "bias",
                    torch.zeros(weight.shape[0], dtype=weight.dtype),
                )
    return state


def load_hf_checkpoint(
    directory: str | os.PathLike,
    *,
    hybrid_layer_pattern: str | None = None,
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read a Hugging Face nemotron_h checkpoint (config.json plus model.safetensors or sharded
    model.safetensors.index.json, as `save_pretrained` or `save_hf_checkpoint` write them) and
    return (canonical state dict, ModelConfig). See `model_config_from_hf_config` for the
    keyword arguments. Raises HFImportError naming the file and key at fault."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    hf_config = _read_json(config_path)
    try:
        config = model_config_from_hf_config(hf_config, hybrid_layer_pattern=hybrid_layer_pattern)
    except HFImportError as e:
        raise HFImportError(f"{config_path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise HFImportError(f"{config_path}: not a usable nemotron_h config ({e!r})") from None
    raw, source = _read_weights(directory)
    state = _normalize_hf_keys(raw, hf_config, config, source)
    config = _fit_config_to_tensors(state, config, source)
    return _hf_to_canonical(state, config, source), config


def _fit_config_to_tensors(
    state: Mapping[str, torch.Tensor], config: ModelConfig, source: str
) -> ModelConfig:
    """Recorded choices that the tensors contradict fall back to the always-exact HF reading:
    an lm_head that differs from the embedding unties them, a nonzero expert-score bias
    enables the expert bias."""
    changes = {}
    embedding, lm_head = state.get("backbone.embeddings.weight"), state.get("lm_head.weight")
    if (
        not config.untie_embeddings_and_output_weights
        and embedding is not None
        and lm_head is not None
        and embedding.shape == lm_head.shape
        and not torch.equal(embedding, lm_head)
    ):
        changes["untie_embeddings_and_output_weights"] = True
    if (
        "E" in _symbols(config)
        and not config.moe_router_enable_expert_bias
        and any(
            key.endswith("mixer.gate.e_score_correction_bias") and bool((t != 0).any())
            for key, t in state.items()
        )
    ):
        changes["moe_router_enable_expert_bias"] = True
    if changes:
        warnings.warn(
            f"{source}: the tensors contradict the recorded config; importing with {changes}",
            stacklevel=3,
        )
        config = dataclasses.replace(config, **changes)
    return config
