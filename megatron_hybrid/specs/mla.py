"""`+`: multi-latent attention (megatron_hybrid/layers/mla.py), with Megatron-Core's names.

Sizes not set are derived from the per-head width d = kv_channels, else hidden_size //
num_attention_heads, in DeepSeek-V2/V3's proportions (d = 128 there):

    qk_head_dim = d        v_head_dim = d        qk_pos_emb_head_dim = d / 2 (even, at least 2)
    kv_lora_rank = 4 d     q_lora_rank: none (queries are not compressed; Megatron's default)

MLA has one key/value latent for all heads, so num_query_groups does not apply to it (Megatron
ignores it without --group-query-attention, which MLA refuses). MLA always rotates its rope dims
(rope_type "yarn" by default, as Megatron's, which with rotary_scaling_factor 1 is plain rope);
position_embedding_type is attention's (`*`) setting.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megatron_hybrid.config_checks import ConfigError, choice, positive
from megatron_hybrid.layers.mla import MultiLatentAttention
from megatron_hybrid.specs.base import (
    ColumnParallel,
    EntersHeads,
    ExtraState,
    KeyMap,
    MegatronCoreLayout,
    MixerSpec,
    Replicated,
    RowParallel,
    Slots,
    TensorParallelPlan,
    rename,
)
from megatron_hybrid.specs.init_rules import normal, ones, output_projection

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig

ROPE_TYPES = ("rope", "yarn")

# The fields of `+` (and of `D`, which builds on it).
CONFIG_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "kv_channels",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "qk_layernorm",
    "rope_type",
    "rotary_base",
    "rotary_scaling_factor",
    "mscale",
    "mscale_all_dim",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "layernorm_epsilon",
)


def per_head_width(config: ModelConfig) -> int:
    """d, the width the derived sizes scale with (module docstring)."""
    if config.kv_channels is not None:
        positive(config, "kv_channels")
        return config.kv_channels
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"hidden_size={config.hidden_size} is not divisible by num_attention_heads="
            f"{config.num_attention_heads}, so MLA cannot derive its head sizes: set "
            "kv_channels (--kv-channels), or qk_head_dim, qk_pos_emb_head_dim, v_head_dim and "
            "kv_lora_rank (--qk-head-dim, --qk-pos-emb-head-dim, --v-head-dim, --kv-lora-rank)"
        )
    return config.hidden_size // config.num_attention_heads


def check_config(config: ModelConfig) -> None:
    if config.num_attention_heads is None:
        raise ConfigError(
            f"pattern {config.hybrid_layer_pattern!r} has MLA ('+') or DeepSeek sparse "
            "attention ('D') layers: set num_attention_heads (--num-attention-heads)"
        )
    positive(config, "num_attention_heads")
    sizes = ("qk_head_dim", "v_head_dim", "qk_pos_emb_head_dim", "kv_lora_rank")
    if any(getattr(config, name) is None for name in sizes):
        d = per_head_width(config)
        derived = dict(
            qk_head_dim=d, v_head_dim=d, qk_pos_emb_head_dim=2 * max(1, d // 4), kv_lora_rank=4 * d
        )
        for name, value in derived.items():
            if getattr(config, name) is None:
                setattr(config, name, value)
    positive(config, *sizes)
    if config.q_lora_rank is not None:
        positive(config, "q_lora_rank")
    if config.qk_pos_emb_head_dim % 2:
        raise ConfigError(
            f"qk_pos_emb_head_dim={config.qk_pos_emb_head_dim} (--qk-pos-emb-head-dim) must be "
            "even: rope rotates pairs of dims"
        )
    if config.rope_type is None:
        config.rope_type = "yarn"
    choice(config, "rope_type", ROPE_TYPES)
    positive(config, "rotary_base", "rotary_scaling_factor", "original_max_position_embeddings")
    positive(config, "beta_fast", "beta_slow")
    for name in ("mscale", "mscale_all_dim"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


# -- cost -----------------------------------------------------------------------------------------
def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """n = num_attention_heads, dn = qk_head_dim, dr = qk_pos_emb_head_dim, dv = v_head_dim,
    rq = q_lora_rank, rkv = kv_lora_rank, T = seq_length:

    queries               2 * H * n * (dn + dr)                 without q_lora_rank
                          2 * H * rq + 2 * rq * n * (dn + dr)   with it
    linear_kv_down_proj   2 * H * (rkv + dr)
    linear_kv_up_proj     2 * rkv * n * (dn + dv)
    Q K^T                 2 * T * n * (dn + dr)
    scores @ V            2 * T * n * dv
        (the full T x T score matrix, no halving for the causal mask: the convention of
        attention's `*` formula; Megatron's MLA count halves these two terms)
    linear_proj           2 * n * dv * H
    """
    return projection_flops(config) + attention_flops(config, seq_length)


def projection_flops(config: ModelConfig) -> float:
    H, n = config.hidden_size, config.num_attention_heads
    dn, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    rq, rkv = config.q_lora_rank, config.kv_lora_rank
    queries = 2 * H * n * (dn + dr) if rq is None else 2 * H * rq + 2 * rq * n * (dn + dr)
    kv = 2 * H * (rkv + dr) + 2 * rkv * n * (dn + dv)
    return queries + kv + 2 * n * dv * H


def attention_flops(config: ModelConfig, keys_per_query: int) -> float:
    """Q K^T and scores @ V per token, each query over `keys_per_query` keys."""
    n = config.num_attention_heads
    dn, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    return 2 * keys_per_query * n * (dn + dr) + 2 * keys_per_query * n * dv


def parameter_count(config: ModelConfig) -> int:
    H, n = config.hidden_size, config.num_attention_heads
    dn, dr, dv = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    rq, rkv = config.q_lora_rank, config.kv_lora_rank
    norms = config.qk_layernorm
    if rq is None:
        queries = H * n * (dn + dr)
    else:
        queries = H * rq + (rq if norms else 0) + rq * n * (dn + dr)
    kv = H * (rkv + dr) + (rkv if norms else 0) + rkv * n * (dn + dv)
    return queries + kv + n * dv * H


INIT_RULES = {
    "linear_q_proj.weight": normal,
    "linear_q_down_proj.weight": normal,
    "q_layernorm.weight": ones,
    "linear_q_up_proj.weight": normal,
    "linear_kv_down_proj.weight": normal,
    "kv_layernorm.weight": ones,
    "linear_kv_up_proj.weight": normal,
    "linear_proj.weight": output_projection,
}

# Heads over the ranks: every head's rows of the up-projections are contiguous ([q_nope, q_pe]
# and [k_nope, v] per head), so a contiguous row split hands every rank whole heads. The
# down-projections and latent norms feed all heads and stay whole on every rank.
PARAMETERS = {
    "linear_q_proj.weight": ColumnParallel(),
    "linear_q_down_proj.weight": Replicated(),
    "q_layernorm.weight": Replicated(),
    "linear_q_up_proj.weight": ColumnParallel(),
    "linear_kv_down_proj.weight": Replicated(),
    "kv_layernorm.weight": Replicated(),
    "linear_kv_up_proj.weight": ColumnParallel(),
    "linear_proj.weight": RowParallel(),
}
TENSOR_PARALLEL = TensorParallelPlan(
    parameters=PARAMETERS,
    divisible=(("num_attention_heads", "--num-attention-heads"),),
    activations={"rope_key": EntersHeads()},
)

# -- Megatron-Core torch_dist ---------------------------------------------------------------------
# Megatron-Core builds `+` as a TransformerLayer holding an MLASelfAttention (multi_latent_
# attention.py), saved under the module names ours has. "te": the hybrid layer spec's mla_layer
# (hybrid_layer_specs.py): input_layernorm a TENorm of its own, TELinear down-projections,
# TEColumnParallelLinear up-projections, TERowParallelLinear linear_proj; with qk_layernorm its
# QKNormConfigResolver (mla_qk_norm_config.py) fuses each latent norm into the up-projection
# after it (TELayerNormColumnParallelLinear: `linear_q_up_proj.layer_norm_weight`). With
# --mla-down-proj-fusion FusedMLASelfAttention fuses input_layernorm into one down-projection but
# saves the same keys (its sharded_state_dict and the layer's keys map); it then asks for no
# input_layernorm._extra_state, which a load passes over (Megatron-LM's default
# --dist-ckpt-strictness accepts objects no module asks for). "local": Megatron's
# local modules as its GPT local spec builds MLA (the hybrid specs have no local MLA layer):
# ColumnParallelLinear / RowParallelLinear linears, the latent norms standalone.
LINEARS = (
    "linear_q_proj",
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
    "linear_proj",
)


def same_names(*modules: str) -> tuple[KeyMap, ...]:
    """The weights of `modules` (in self_attention) under our names."""
    return tuple(
        rename(f"self_attention.{m}.weight", f"self_attention.{m}.weight") for m in modules
    )


def extra_states(*modules: str) -> tuple[ExtraState, ...]:
    """An `_extra_state` for each of `modules` (in self_attention) that the layer has."""
    return tuple(
        ExtraState(f"self_attention.{m}", of=f"self_attention.{m}.weight") for m in modules
    )


INPUT_LAYERNORM = rename("input_layernorm.weight", "input_layernorm.weight")
STANDALONE_NORMS = same_names("q_layernorm", "kv_layernorm")
INPUT_LAYERNORM_EXTRA_STATE = ExtraState("input_layernorm", of="input_layernorm.weight")


def query_norm_without_latent(config: ModelConfig) -> str | None:
    if config.qk_layernorm and config.q_lora_rank is None:
        return (
            "with qk_layernorm (--qk-layernorm) and no q_lora_rank (--q-lora-rank), Megatron-Core "
            "normalizes MLA's input once more inside linear_q_proj (TE's "
            "`linear_q_proj.layer_norm_weight`; its local modules cannot build it), which MLA "
            "here does not; set --q-lora-rank, or leave out --qk-layernorm"
        )
    return None


MEGATRON_CORE = MegatronCoreLayout(
    key_maps={
        "local": (INPUT_LAYERNORM, *same_names(*LINEARS), *STANDALONE_NORMS),
        "te": (
            INPUT_LAYERNORM,
            *same_names(*LINEARS),
            rename(
                "self_attention.q_layernorm.weight",
                "self_attention.linear_q_up_proj.layer_norm_weight",
            ),
            rename(
                "self_attention.kv_layernorm.weight",
                "self_attention.linear_kv_up_proj.layer_norm_weight",
            ),
        ),
    },
    # Every Megatron linear saves one (None for local ones); of the norms only TE's TENorm does
    # (the fused latent norms live in their linear's).
    extra_state={
        "local": extra_states(*LINEARS),
        "te": (INPUT_LAYERNORM_EXTRA_STATE, *extra_states(*LINEARS)),
    },
    unsupported=query_norm_without_latent,
)

SPEC = MixerSpec(
    symbol="+",
    build=MultiLatentAttention,
    config_fields=CONFIG_FIELDS,
    check_config=check_config,
    # Megatron's TransformerLayer names (hybrid mla_layer; local spec, standalone norms).
    slots=Slots(norm="input_layernorm", mixer="self_attention"),
    init_rules=INIT_RULES,
    tensor_parallel=TENSOR_PARALLEL,
    forward_flops_per_token=forward_flops_per_token,
    parameter_count=parameter_count,
    hf_nemotron_h=None,  # nemotron_h has no MLA layer
    megatron_core=MEGATRON_CORE,
)
