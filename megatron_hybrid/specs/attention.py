"""`*`: causal self-attention with grouped-query attention (megatron_hybrid/layers/attention.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from megatron_hybrid.config_checks import ConfigError, divisors, positive
from megatron_hybrid.layers.attention import SelfAttention
from megatron_hybrid.specs.base import (
    ColumnParallel,
    ExtraState,
    ForeignLayout,
    KeyMap,
    MegatronCoreLayout,
    MixerSpec,
    RowParallel,
    Slots,
    TensorParallelPlan,
    rename,
)
from megatron_hybrid.specs.init_rules import normal, output_projection

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


def check_config(config: ModelConfig) -> None:
    if config.num_attention_heads is None:
        raise ConfigError(
            f"pattern {config.hybrid_layer_pattern!r} has attention ('*') layers: "
            "set num_attention_heads (--num-attention-heads)"
        )
    positive(config, "num_attention_heads")
    if config.num_query_groups is None:
        config.num_query_groups = config.num_attention_heads
    positive(config, "num_query_groups")
    if config.num_attention_heads % config.num_query_groups:
        raise ConfigError(
            f"num_attention_heads={config.num_attention_heads} is not divisible by "
            f"num_query_groups={config.num_query_groups}: every query group must hold the "
            f"same number of heads; valid group counts: "
            f"{divisors(config.num_attention_heads)}"
        )
    if config.kv_channels is None:
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads="
                f"{config.num_attention_heads}; set kv_channels (--kv-channels) explicitly "
                "or pick a head count that divides hidden_size"
            )
        config.kv_channels = config.hidden_size // config.num_attention_heads
    positive(config, "kv_channels")
    if config.position_embedding_type == "rope" and config.kv_channels % 2:
        raise ConfigError(f"rotary embeddings need an even kv_channels, got {config.kv_channels}")
    # Settings of MLA's (megatron_hybrid/specs/mla.py) that attention does not read.
    if config.qk_layernorm:
        raise ConfigError(
            "qk_layernorm (--qk-layernorm) normalizes MLA's latents: it applies to MLA ('+') and "
            "DeepSeek sparse attention ('D'), not to attention ('*')"
        )
    if config.rope_type not in (None, "rope"):
        raise ConfigError(
            f"rope_type={config.rope_type!r} (--rope-type) applies to MLA ('+') and DeepSeek "
            "sparse attention ('D'); attention ('*') takes --position-embedding-type rope"
        )


def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """a = num_attention_heads, g = num_query_groups, d = kv_channels, T = seq_length:

    linear_qkv                 2 * H * (a + 2*g) * d
    Q K^T and scores @ V       2 * 2 * T * d * a
        (Megatron's convention: the full T x T score matrix, no halving for the causal mask;
        a causal-aware count would be half of this term)
    linear_proj                2 * a * d * H
    """
    H = config.hidden_size
    a, g, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
    qkv = 2 * H * (a + 2 * g) * d
    scores = 2 * 2 * seq_length * d * a  # full T, Megatron's convention
    proj = 2 * a * d * H
    return qkv + scores + proj


def parameter_count(config: ModelConfig) -> int:
    H = config.hidden_size
    a, g, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
    return H * (a + 2 * g) * d + a * d * H


# -- Hugging Face nemotron_h: q, k and v apart --------------------------------------------------
def split_qkv(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
    """Megatron's grouped rows [q heads of group g, k_g, v_g] -> q, k, v (HF layout, where
    query head h reads key/value head h // (heads / groups), as ours does)."""
    (qkv,) = tensors
    groups, d = config.num_query_groups, config.kv_channels
    per_group = config.num_attention_heads // groups
    w = qkv.reshape(groups, per_group + 2, d, qkv.shape[-1])
    q = w[:, :per_group].reshape(groups * per_group * d, -1)
    k = w[:, per_group].reshape(groups * d, -1)
    v = w[:, per_group + 1].reshape(groups * d, -1)
    return [q, k, v]


def merge_qkv(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
    """Inverse of `split_qkv`."""
    q, k, v = tensors
    groups, d = config.num_query_groups, config.kv_channels
    per_group = config.num_attention_heads // groups
    hidden = q.shape[-1]
    w = torch.cat(
        [
            q.reshape(groups, per_group, d, hidden),
            k.reshape(groups, 1, d, hidden),
            v.reshape(groups, 1, d, hidden),
        ],
        dim=1,
    )
    return [w.reshape(groups * (per_group + 2) * d, hidden)]


HF_NEMOTRON_H = ForeignLayout(
    layer_type="full_attention",
    key_maps=(
        rename("input_layernorm.weight", "norm.weight"),
        KeyMap(
            ("self_attention.linear_qkv.weight",),
            ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"),
            to_theirs=split_qkv,
            to_ours=merge_qkv,
        ),
        rename("self_attention.linear_proj.weight", "mixer.o_proj.weight"),
    ),
)

_MCORE_SAME = (
    rename("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight"),
    rename("self_attention.linear_proj.weight", "self_attention.linear_proj.weight"),
)
_MCORE_LINEARS = (
    ExtraState("self_attention.linear_qkv", of="self_attention.linear_qkv.weight"),
    ExtraState("self_attention.linear_proj", of="self_attention.linear_proj.weight"),
)
MEGATRON_CORE = MegatronCoreLayout(
    key_maps={
        "local": (rename("input_layernorm.weight", "input_layernorm.weight"), *_MCORE_SAME),
        # TE's spec fuses the pre-norm into linear_qkv (TELayerNormColumnParallelLinear).
        "te": (
            rename("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
            *_MCORE_SAME,
        ),
    },
    # TEDotProductAttention saves no _extra_state (only a learnable softmax offset, unused here).
    extra_state={"local": _MCORE_LINEARS, "te": _MCORE_LINEARS},
)

SPEC = MixerSpec(
    symbol="*",
    build=SelfAttention,
    config_fields=(
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "position_embedding_type",
        "rotary_base",
    ),
    check_config=check_config,
    slots=Slots(norm="input_layernorm", mixer="self_attention"),  # Megatron's names
    init_rules={"linear_qkv.weight": normal, "linear_proj.weight": output_projection},
    # Megatron's grouped qkv rows keep a query group's q heads, k and v together, so a
    # contiguous row split hands every rank whole groups.
    tensor_parallel=TensorParallelPlan(
        parameters={"linear_qkv.weight": ColumnParallel(), "linear_proj.weight": RowParallel()},
        divisible=(
            ("num_attention_heads", "--num-attention-heads"),
            ("num_query_groups", "--num-query-groups"),
        ),
    ),
    forward_flops_per_token=forward_flops_per_token,
    parameter_count=parameter_count,
    hf_nemotron_h=HF_NEMOTRON_H,
    megatron_core=MEGATRON_CORE,
)
