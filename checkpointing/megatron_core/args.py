"""Megatron-LM's `args` (the Namespace its checkpoints keep in their common state) <-> our
ModelConfig.

Reading: ModelConfig fields from the argument of the same name (Megatron's TransformerConfig
names, which its parser uses as dests), where Megatron has one; settings a model here cannot
compute (LayerNorm, biases, QK norms outside MLA/DSA, GELU, ...) are refused, each named.
Megatron's args do not hold what is ours alone (fusion groups, the SSD chunk length, Mamba's dt
clamp): a checkpoint written by `to-megatron` keeps our config beside them
(`args.megatron_hybrid`), and a read takes those fields from there. Writing: the args
Megatron-LM's loader reads from a checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from megatron_hybrid.config import ConfigError, ModelConfig
from megatron_hybrid.pattern import MTP_SEPARATOR, PatternError, parse_hybrid_pattern
from megatron_hybrid.specs import SPECS

# ModelConfig field -> Megatron-LM argument (TransformerConfig field or parser dest), in order of
# preference (older Megatron-LM versions used the later names).
ARG_NAMES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size",),
    "ffn_hidden_size": ("ffn_hidden_size",),
    "num_attention_heads": ("num_attention_heads",),
    "kv_channels": ("kv_channels",),
    "position_embedding_type": ("position_embedding_type",),
    "rotary_base": ("rotary_base",),
    "mamba_state_dim": ("mamba_state_dim",),
    "mamba_head_dim": ("mamba_head_dim",),
    "mamba_num_groups": ("mamba_num_groups",),
    "mamba_num_heads": ("mamba_num_heads",),
    "num_moe_experts": ("num_experts", "num_moe_experts"),
    "moe_router_topk": ("moe_router_topk",),
    "moe_ffn_hidden_size": ("moe_ffn_hidden_size",),
    "moe_shared_expert_intermediate_size": ("moe_shared_expert_intermediate_size",),
    "moe_router_score_function": ("moe_router_score_function",),
    "moe_router_pre_softmax": ("moe_router_pre_softmax",),
    "moe_router_topk_scaling_factor": ("moe_router_topk_scaling_factor",),
    "moe_router_enable_expert_bias": ("moe_router_enable_expert_bias",),
    "moe_router_bias_update_rate": ("moe_router_bias_update_rate",),
    "moe_router_num_groups": ("moe_router_num_groups",),
    "moe_router_group_topk": ("moe_router_group_topk",),
    "moe_latent_size": ("moe_latent_size",),
    "linear_conv_kernel_dim": ("linear_conv_kernel_dim",),
    "linear_key_head_dim": ("linear_key_head_dim",),
    "linear_value_head_dim": ("linear_value_head_dim",),
    "linear_num_key_heads": ("linear_num_key_heads",),
    "linear_num_value_heads": ("linear_num_value_heads",),
    "layernorm_epsilon": ("layernorm_epsilon", "norm_epsilon"),
    "init_method_std": ("init_method_std",),
    "untie_embeddings_and_output_weights": ("untie_embeddings_and_output_weights",),
}
# Fields of MLA ('+') and DSA ('D'), whose arguments Megatron-LM's args hold with defaults
# whatever the model (kv_lora_rank 32, ...): read only when a layer of the pattern reads the
# field (its spec's config_fields). The YaRN fields are MLATransformerConfig's own, which
# Megatron-LM's flags do not set (its --yarn-* flags are GPT's YaRN): present only when a run
# set them otherwise, else Megatron's defaults, ours too.
MIXER_ARG_NAMES: dict[str, tuple[str, ...]] = {
    name: (name,)
    for name in (
        "q_lora_rank",
        "kv_lora_rank",
        "qk_head_dim",
        "qk_pos_emb_head_dim",
        "v_head_dim",
        "qk_layernorm",
        "rope_type",
        "rotary_scaling_factor",
        "mscale",
        "mscale_all_dim",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "dsa_indexer_n_heads",
        "dsa_indexer_head_dim",
        "dsa_indexer_topk",
        "dsa_indexer_loss_coeff",
        "dsa_indexer_use_sparse_loss",
    )
}
# Read only for a pattern with MTP depths: Megatron-LM's args hold it (0.1) whatever the model.
MTP_ARG_NAMES: dict[str, tuple[str, ...]] = {
    "mtp_loss_scaling_factor": ("mtp_loss_scaling_factor",),
}
LATENT_ATTENTION = "+D"  # the symbols Megatron-LM builds with --multi-latent-attention
PATTERN_ARGS = ("hybrid_layer_pattern", "hybrid_override_pattern")
# Before the pattern's '/' parts, Megatron-LM kept one MTP depth's pattern apart; its
# arguments.py joins it to the main pattern once per --mtp-num-layers (the depths).
LEGACY_MTP_PATTERN_ARG = "mtp_hybrid_override_pattern"
OUR_CONFIG_ARG = "megatron_hybrid"  # our ModelConfig.to_dict(), written by to-megatron

_MISSING = object()


def arg(args: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that `args` (a Namespace or a stand-in) has, else `default`."""
    for name in names:
        value = getattr(args, name, _MISSING)
        if value is not _MISSING:
            return value
    return default


_PLAIN_NORMS = "plain norm weights (no --apply-layernorm-1p)"
# Megatron settings whose values a model here cannot compute: (argument, the value we need or a
# predicate on it, what it means).
_REQUIRED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("normalization", lambda v: v in (None, "RMSNorm"), "RMSNorm (LayerNorm is not implemented)"),
    ("add_bias_linear", lambda v: not v, "no linear biases (--disable-bias-linear)"),
    ("layernorm_zero_centered_gamma", lambda v: not v, _PLAIN_NORMS),
    ("apply_layernorm_1p", lambda v: not v, _PLAIN_NORMS),
    ("moe_shared_expert_gate", lambda v: not v, "no shared-expert gate"),
    ("rotary_percent", lambda v: v in (None, 1.0), "rotary embeddings over the whole head (1.0)"),
    (
        "position_embedding_type",
        lambda v: v in (None, "rope", "none"),
        "rope or none (learned absolute, yarn, mrope and relative are not implemented)",
    ),
    ("rotary_interleaved", lambda v: not v, "rotary embeddings on halves, not interleaved"),
    ("use_rope_scaling", lambda v: not v, "no llama-3 rope scaling"),
    ("rotary_seq_len_interpolation_factor", lambda v: v is None, "no rope interpolation"),
    ("no_rope_freq", lambda v: v is None, "rope in every attention layer"),
    ("window_size", lambda v: v is None, "full causal attention (no --window-size)"),
    ("qk_l2_norm", lambda v: not v, "no QK L2 norm"),
    ("softmax_type", lambda v: v in (None, "vanilla"), "the plain attention softmax"),
    ("moe_expert_capacity_factor", lambda v: v is None, "no token dropping"),
    (
        "experimental_attention_variant",
        lambda v: v in (None, "gdn", "gated_delta_net", "dsa"),
        "Gated DeltaNet as `G` or DSA as `D` (the gdn2 variant is not implemented)",
    ),
    ("dsa_indexer_topk_freq", lambda v: v in (None, 1), "an indexer in every DSA layer"),
    ("dsa_indexer_rope_interleaved", lambda v: not v, "the DSA indexer's rope on halves"),
    ("dsa_indexer_scoring_relu", lambda v: v in (None, True), "relu DSA index scores"),
    (
        "dsa_indexer_k_norm_epsilon",
        lambda v: v is None,
        "the DSA indexer's k_norm at --norm-epsilon (unset)",
    ),
    ("mtp_use_repeated_layer", lambda v: not v, "MTP depths with layers of their own"),
    ("mtp_hsm", lambda v: not v, "no hidden-state mixing between MTP depths"),
    ("mtp_detach_heads", lambda v: not v, "MTP losses that train the main model too"),
)


def model_config_from_args(args: Any, vocab_size: int, source: str) -> ModelConfig:
    """The ModelConfig a Megatron-LM run's `args` describe, for an embedding of `vocab_size`
    rows (fields Megatron-LM has no argument for: our record of them, else the defaults).
    Raises ConfigError naming `source` (the checkpoint) and every argument whose value a model
    here cannot compute."""
    fields = {**model_fields_from_args(args, source), "vocab_size": vocab_size}
    try:
        return ModelConfig(**fields)
    except (ConfigError, PatternError, TypeError) as error:
        raise ConfigError(f"{source}: the saved Megatron-LM arguments: {error}") from error


def model_fields_from_args(args: Any, source: str) -> dict[str, Any]:
    """The ModelConfig fields a Megatron-LM run's `args` hold (and those of our config that
    to-megatron recorded beside them), unchecked; ConfigError as `model_config_from_args`."""
    problems = [
        f"{name}={arg(args, name)!r} (need {need})"
        for name, ok, need in _REQUIRED
        if not ok(arg(args, name))
    ]
    fields: dict[str, Any] = {}
    pattern = _with_legacy_mtp_pattern(args, arg(args, *PATTERN_ARGS))
    if not isinstance(pattern, str):
        problems.append(
            f"no hybrid_layer_pattern (found {pattern!r}): not a hybrid model, or its pattern "
            "came from the deprecated ratio arguments"
        )
        pattern = ""
    if arg(args, "qk_layernorm") and not set(pattern) & set(LATENT_ATTENTION):
        problems.append(
            f"qk_layernorm={arg(args, 'qk_layernorm')!r} (need no QK layernorm: here it "
            "normalizes the latents of MLA ('+') and DSA ('D') layers, which the pattern lacks)"
        )
    activation = _activation(args)
    if activation is None:
        problems.append("neither swiglu nor squared_relu is set (GELU is not implemented)")
    if problems:
        raise ConfigError(
            f"{source}: the saved Megatron-LM arguments describe a model this version does not "
            "build:\n  " + "\n  ".join(problems)
        )
    read_by_layers = {f for s in set(pattern) if s in SPECS for f in SPECS[s].config_fields}
    mixer_names = {f: n for f, n in MIXER_ARG_NAMES.items() if f in read_by_layers}
    mtp_names = MTP_ARG_NAMES if MTP_SEPARATOR in pattern else {}
    for field, names in {**ARG_NAMES, **mixer_names, **mtp_names}.items():
        value = arg(args, *names, default=_MISSING)
        if value is not _MISSING and value is not None:
            fields[field] = value
    # MLA and DSA layers read no num_query_groups (Megatron-LM refuses --group-query-attention
    # with MLA): a pattern with them keeps ours.
    if not set(pattern) & set(LATENT_ATTENTION):
        grouped = arg(args, "group_query_attention", default=True) is not False
        # Without grouping: one key/value group per head.
        fields["num_query_groups"] = arg(args, "num_query_groups") if grouped else None
    fields["activation"] = activation
    fields["moe_aux_loss_coeff"] = _aux_loss_coeff(args)
    if "rotary_base" in fields:
        fields["rotary_base"] = float(fields["rotary_base"])  # an int flag in Megatron-LM
    ours = _our_recorded_config(args, pattern)
    ours.pop("vocab_size", None)  # the checkpoint's embedding says it
    return {**ours, **fields, "hybrid_layer_pattern": ours.get("hybrid_layer_pattern", pattern)}


def _with_legacy_mtp_pattern(args: Any, pattern: Any) -> Any:
    """`pattern` with the MTP depths that older Megatron-LM runs kept apart
    (LEGACY_MTP_PATTERN_ARG), as Megatron-LM's arguments.py joins them."""
    legacy, depths = arg(args, LEGACY_MTP_PATTERN_ARG), arg(args, "mtp_num_layers")
    if not (isinstance(pattern, str) and isinstance(legacy, str) and depths):
        return pattern
    if MTP_SEPARATOR in pattern:  # Megatron-LM ignores the legacy pattern then
        return pattern
    return pattern + (MTP_SEPARATOR + legacy) * depths


def _activation(args: Any) -> str | None:
    if arg(args, "swiglu"):
        return "swiglu"
    if arg(args, "squared_relu"):
        return "squared_relu"
    return None


def _aux_loss_coeff(args: Any) -> float:
    """Megatron's coefficient of the switch load-balancing loss (`aux_loss`; a list pairs
    coefficients with several balancing types), 0.0 when that loss is off."""
    types = arg(args, "moe_router_load_balancing_type", default="aux_loss")
    coeffs = arg(args, "moe_aux_loss_coeff", default=0.0)
    types = types if isinstance(types, (list, tuple)) else [types]
    coeffs = coeffs if isinstance(coeffs, (list, tuple)) else [coeffs] * len(types)
    return float(sum(c for t, c in zip(types, coeffs, strict=False) if t == "aux_loss"))


def _our_recorded_config(args: Any, pattern: str) -> dict:
    """Our config as to-megatron recorded it, when it describes the same layers as `pattern`
    (so a run continued in Megatron-LM and converted back keeps its fusion groups); {} else."""
    recorded = arg(args, OUR_CONFIG_ARG)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("hybrid_layer_pattern"), str):
        return {}
    try:
        same = megatron_pattern(recorded["hybrid_layer_pattern"]) == megatron_pattern(pattern)
    except PatternError:
        return {}
    known = set(ModelConfig.__dataclass_fields__)
    return {k: v for k, v in recorded.items() if k in known} if same else {}


def megatron_pattern(pattern: str) -> str:
    """`pattern` as Megatron-Core writes it: the same layers and stages, no fusion groups."""
    parsed = parse_hybrid_pattern(pattern)
    main = "|".join("".join(stage) for stage in parsed.stages)
    return main + (MTP_SEPARATOR + "".join(parsed.mtp_blocks)) * parsed.mtp_depths


def args_from_model_config(
    config: ModelConfig,
    *,
    iteration: int,
    consumed_train_samples: int,
    tensor_parallel: int,
    pipeline_parallel: int,
) -> argparse.Namespace:
    """The `args` a Megatron-LM run of `config` would have saved, as far as its loader reads
    them: the model's arguments, the parallel layout the checkpoint was written for, and that
    it holds neither optimizer nor RNG state (so Megatron-LM neither looks for them nor checks
    the data-parallel layout). Only plain values: Megatron-LM unpickles it with
    `weights_only=True`."""
    layers = "".join(config.pattern.blocks)
    values = {
        "hybrid_layer_pattern": megatron_pattern(config.hybrid_layer_pattern),
        "num_layers": config.pattern.num_layers,  # the main decoder's, as Megatron-LM counts
        # Megatron-LM infers it from the pattern's '/' parts, its checkpoint loader sets it.
        "mtp_num_layers": config.mtp_num_layers,
        "mtp_use_repeated_layer": False,
        "normalization": "RMSNorm",
        "add_bias_linear": False,
        "multi_latent_attention": bool(set(layers) & set(LATENT_ATTENTION)),
        "experimental_attention_variant": "dsa" if "D" in layers else None,
        "swiglu": config.activation == "swiglu",
        "squared_relu": config.activation == "squared_relu",
        # Megatron-LM asserts that MLA and grouped-query attention exclude each other.
        "group_query_attention": not set(layers) & set(LATENT_ATTENTION)
        and config.num_query_groups not in (None, config.num_attention_heads),
        "num_query_groups": config.num_query_groups,
        "rotary_percent": 1.0,
        "norm_epsilon": config.layernorm_epsilon,
        "moe_aux_loss_coeff": config.moe_aux_loss_coeff,
        "moe_router_load_balancing_type": "aux_loss",
        "padded_vocab_size": config.vocab_size,
        "tensor_model_parallel_size": tensor_parallel,
        "pipeline_model_parallel_size": pipeline_parallel,
        "world_size": tensor_parallel * pipeline_parallel,
        "data_parallel_size": 1,
        "iteration": iteration,
        "consumed_train_samples": consumed_train_samples,
        "skipped_train_samples": 0,
        "consumed_valid_samples": 0,
        "ckpt_format": "torch_dist",
        "use_distributed_optimizer": False,
        "async_save": False,
        "no_save_optim": True,
        "no_save_rng": True,
        OUR_CONFIG_ARG: config.to_dict(),
    }
    for field, names in {**ARG_NAMES, **MIXER_ARG_NAMES, **MTP_ARG_NAMES}.items():
        values[names[0]] = getattr(config, field)
    if float(config.rotary_base).is_integer():
        values["rotary_base"] = int(config.rotary_base)  # an int flag in Megatron-LM
    return argparse.Namespace(**values)
