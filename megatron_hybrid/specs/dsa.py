"""`D`: DeepSeek sparse attention (megatron_hybrid/layers/dsa.py), multi-latent attention with a
lightning indexer, with Megatron-Core's names. Its MLA part takes `+`'s fields, sizes and rules
(megatron_hybrid/specs/mla.py); the indexer's sizes not set are derived in DeepSeek-V3.2's
proportions (64 indexer heads of 128 for 128 heads of qk_head_dim 128, top 2048 keys):

    dsa_indexer_n_heads = num_attention_heads / 2 (at least 1)
    dsa_indexer_head_dim = qk_head_dim          dsa_indexer_topk = 2048

The indexer learns only from its KL loss: --dsa-indexer-loss-coeff (0 by default, as Megatron's).
Tensor parallelism splits the heads as for MLA and keeps the indexer whole on every rank.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megatron_hybrid.config_checks import ConfigError, positive
from megatron_hybrid.layers.dsa import DeepSeekSparseAttention
from megatron_hybrid.specs import mla
from megatron_hybrid.specs.base import (
    MEGATRON_LAYER_SPECS,
    EntersHeads,
    MegatronCoreLayout,
    MixerSpec,
    Replicated,
    Slots,
    SumOverHeads,
    TensorParallelPlan,
    rename,
)
from megatron_hybrid.specs.init_rules import normal, ones, zeros

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig

DEFAULT_TOPK = 2048
_INDEXER = "core_attention.indexer."


def check_config(config: ModelConfig) -> None:
    mla.check_config(config)
    if config.dsa_indexer_n_heads is None:
        config.dsa_indexer_n_heads = max(1, config.num_attention_heads // 2)
    if config.dsa_indexer_head_dim is None:
        config.dsa_indexer_head_dim = config.qk_head_dim
    if config.dsa_indexer_topk is None:
        config.dsa_indexer_topk = DEFAULT_TOPK
    positive(config, "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk")
    if config.dsa_indexer_head_dim < config.qk_pos_emb_head_dim:
        raise ConfigError(
            f"dsa_indexer_head_dim={config.dsa_indexer_head_dim} (--dsa-indexer-head-dim) is "
            f"below qk_pos_emb_head_dim={config.qk_pos_emb_head_dim}: the indexer rotates its "
            "first qk_pos_emb_head_dim dims; valid: at least that many"
        )
    coeff = config.dsa_indexer_loss_coeff
    if not (math.isfinite(coeff) and coeff >= 0):
        raise ConfigError(
            f"dsa_indexer_loss_coeff (--dsa-indexer-loss-coeff) must be a finite number >= 0, "
            f"got {coeff!r}; 0 turns the indexer's loss off"
        )


# -- cost -----------------------------------------------------------------------------------------
def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """MLA's projections (specs/mla.py), plus, with ni = dsa_indexer_n_heads, di =
    dsa_indexer_head_dim, rq = q_lora_rank (hidden_size without it), K = min(dsa_indexer_topk,
    T), T = seq_length:

    indexer linear_wq_b            2 * rq * ni * di
    indexer linear_wk              2 * H * di
    indexer linear_weights_proj    2 * H * ni
    index scores q^I . k^I         2 * T * ni * di      (full T x T, as attention's)
    attention over the K keys      2 * K * n * (dn + dr) + 2 * K * n * dv
    indexer loss's target          2 * T * n * (dn + dr)   with dsa_indexer_loss_coeff > 0
        (the dense scores the KL loss compares against, computed in forward)
    """
    H, ni, di = config.hidden_size, config.dsa_indexer_n_heads, config.dsa_indexer_head_dim
    rq = config.q_lora_rank if config.q_lora_rank is not None else H
    indexer = 2 * rq * ni * di + 2 * H * di + 2 * H * ni + 2 * seq_length * ni * di
    attention = mla.attention_flops(config, min(config.dsa_indexer_topk, seq_length))
    target = 0.0
    if config.dsa_indexer_loss_coeff > 0:
        n, dqk = config.num_attention_heads, config.qk_head_dim + config.qk_pos_emb_head_dim
        target = 2 * seq_length * n * dqk
    return mla.projection_flops(config) + indexer + attention + target


def parameter_count(config: ModelConfig) -> int:
    H, ni, di = config.hidden_size, config.dsa_indexer_n_heads, config.dsa_indexer_head_dim
    rq = config.q_lora_rank if config.q_lora_rank is not None else H
    indexer = rq * ni * di + H * di + 2 * di + H * ni  # wq_b, wk, k_norm (weight, bias), weights
    return mla.parameter_count(config) + indexer


INDEXER_INIT_RULES = {
    _INDEXER + "linear_wq_b.weight": normal,
    _INDEXER + "linear_wk.weight": normal,
    _INDEXER + "k_norm.weight": ones,
    _INDEXER + "k_norm.bias": zeros,
    _INDEXER + "linear_weights_proj.weight": normal,
}

# The indexer sees the same (whole) inputs on every rank, so every rank selects the same keys.
TENSOR_PARALLEL = TensorParallelPlan(
    parameters={
        **mla.PARAMETERS,
        **{name: Replicated() for name in INDEXER_INIT_RULES},
    },
    divisible=mla.TENSOR_PARALLEL.divisible,
    activations={"rope_key": EntersHeads(), "core_attention.head_sum": SumOverHeads()},
)

# -- Megatron-Core torch_dist ---------------------------------------------------------------------
# Megatron-Core builds `D` as a TransformerLayer holding MLA whose core_attention is a DSAttention
# with its DSAIndexer at `core_attention.indexer`. Its QKNormConfigResolver keeps DSA's latent
# norms standalone in every layer spec (the indexer reads the normed query latent), so both
# spell every tensor as ours does. "te": the hybrid layer spec's dsa_layer (AbsorbedMLASelf-
# Attention, which saves linear_kv_up_proj whole): TE linears, the indexer's TELinear
# projections, and TENorm for input_layernorm, the latent norms and the indexer's k_norm.
# "local": the hybrid local spec of Megatron's ModelOpt (post_training/modelopt/hybrid/
# model_specs.py): ColumnParallelLinear / RowParallelLinear for the query/key-value heads and
# linear_proj, ModelOpt's `Linear` (a torch.nn.Linear) for the down-projections and the
# indexer, and its `Norm`, which drops TE's _extra_state, for input_layernorm and k_norm. The
# latent norms come from the resolver: TENorm (with an _extra_state) under Megatron-LM's default
# --transformer-impl, so theirs are written (Megatron-LM's default --dist-ckpt-strictness lets
# a load pass over an object no module asks for, not over a missing one).
_INDEXER_MAPS = tuple(
    rename(f"self_attention.{name}", f"self_attention.{name}") for name in INDEXER_INIT_RULES
)
_LATENT_NORMS_EXTRA_STATE = mla.extra_states("q_layernorm", "kv_layernorm")
_HEAD_LINEARS = ("linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj", "linear_proj")


def query_norm_without_latent(config: ModelConfig) -> str | None:
    if config.qk_layernorm and config.q_lora_rank is None:
        return (
            "Megatron-Core's DSA refuses qk_layernorm (--qk-layernorm) without q_lora_rank "
            "(--q-lora-rank), which would need a query norm fused into linear_q_proj; set "
            "--q-lora-rank, or leave out --qk-layernorm"
        )
    return None


MEGATRON_CORE = MegatronCoreLayout(
    key_maps={
        layer_spec: (
            mla.INPUT_LAYERNORM,
            *mla.same_names(*mla.LINEARS),
            *mla.STANDALONE_NORMS,
            *_INDEXER_MAPS,
        )
        for layer_spec in MEGATRON_LAYER_SPECS
    },
    extra_state={
        "local": (*mla.extra_states(*_HEAD_LINEARS), *_LATENT_NORMS_EXTRA_STATE),
        "te": (
            mla.INPUT_LAYERNORM_EXTRA_STATE,
            *mla.extra_states(*mla.LINEARS),
            *_LATENT_NORMS_EXTRA_STATE,
            *mla.extra_states(
                *(
                    _INDEXER + module
                    for module in ("linear_wq_b", "linear_wk", "k_norm", "linear_weights_proj")
                )
            ),
        ),
    },
    unsupported=query_norm_without_latent,
)

SPEC = MixerSpec(
    symbol="D",
    build=DeepSeekSparseAttention,
    config_fields=(
        *mla.CONFIG_FIELDS,
        "dsa_indexer_n_heads",
        "dsa_indexer_head_dim",
        "dsa_indexer_topk",
        "dsa_indexer_loss_coeff",
        "dsa_indexer_use_sparse_loss",
    ),
    check_config=check_config,
    # Megatron's hybrid dsa_layer: a TransformerLayer, the indexer under core_attention.
    slots=Slots(norm="input_layernorm", mixer="self_attention"),
    init_rules={**mla.INIT_RULES, **INDEXER_INIT_RULES},
    tensor_parallel=TENSOR_PARALLEL,
    forward_flops_per_token=forward_flops_per_token,
    parameter_count=parameter_count,
    hf_nemotron_h=None,  # nemotron_h has no DSA layer
    megatron_core=MEGATRON_CORE,
)
