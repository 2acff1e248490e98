"""`G`: Gated DeltaNet (megatron_hybrid/layers/gated_delta_net.py), Megatron-Core's GatedDeltaNet.

Sizes. Megatron-Core reads them from `--linear-num-key-heads`, `--linear-num-value-heads`,
`--linear-key-head-dim`, `--linear-value-head-dim` and `--linear-conv-kernel-dim` (defaults 16,
32, 128, 128 and 4: Qwen3-Next's). The same flags set them here; those not given derive from the
model's attention sizes, so that `--hybrid-layer-pattern "[G-]M"` with the usual size flags
builds a model in proportion to its hidden size:

    linear_num_key_heads    = num_attention_heads
    linear_key_head_dim     = hidden_size // num_attention_heads
    linear_num_value_heads  = 2 * linear_num_key_heads
    linear_value_head_dim   = linear_key_head_dim
    linear_conv_kernel_dim  = 4                                  (Megatron's default)

These are Qwen3-Next's ratios (hidden 2048 and 16 attention heads give its 16 key heads and 32
value heads of 128 channels, Megatron-Core's defaults), so the GDN layer's width (value heads x
value dim = 2 x hidden) is that of a Mamba2 layer of expand 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_hybrid.config_checks import ConfigError, positive
from megatron_hybrid.layers.gated_delta_net import GatedDeltaNet
from megatron_hybrid.specs.base import (
    ColumnParallel,
    ExtraState,
    MegatronCoreLayout,
    MixerSpec,
    ReplicatedSummedGradient,
    RowParallel,
    Slots,
    SplitRows,
    TensorParallelPlan,
    rename,
    split_keys,
)
from megatron_hybrid.specs.init_rules import normal, ones, output_projection
from megatron_hybrid.specs.mamba2 import a_log

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


def check_config(config: ModelConfig) -> None:
    """Fill the derived sizes (module docstring) and check them."""
    positive(config, "linear_conv_kernel_dim")
    if config.linear_num_key_heads is None or config.linear_key_head_dim is None:
        if config.num_attention_heads is None:
            raise ConfigError(
                f"pattern {config.hybrid_layer_pattern!r} has Gated DeltaNet ('G') layers, "
                "whose sizes derive from num_attention_heads (--num-attention-heads): set it, or "
                "set linear_num_key_heads (--linear-num-key-heads) and linear_key_head_dim "
                "(--linear-key-head-dim)"
            )
        positive(config, "num_attention_heads")
    if config.linear_num_key_heads is None:
        config.linear_num_key_heads = config.num_attention_heads
    if config.linear_key_head_dim is None:
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads="
                f"{config.num_attention_heads}, from which Gated DeltaNet's key head dim "
                "derives; set linear_key_head_dim (--linear-key-head-dim) explicitly"
            )
        config.linear_key_head_dim = config.hidden_size // config.num_attention_heads
    positive(config, "linear_num_key_heads", "linear_key_head_dim")
    if config.linear_num_value_heads is None:
        config.linear_num_value_heads = 2 * config.linear_num_key_heads
    if config.linear_value_head_dim is None:
        config.linear_value_head_dim = config.linear_key_head_dim
    positive(config, "linear_num_value_heads", "linear_value_head_dim")
    key_heads, value_heads = config.linear_num_key_heads, config.linear_num_value_heads
    if value_heads % key_heads:
        raise ConfigError(
            f"linear_num_value_heads={value_heads} (--linear-num-value-heads) is not a multiple "
            f"of linear_num_key_heads={key_heads} (--linear-num-key-heads): every key head "
            f"serves the same number of value heads; valid: a multiple of {key_heads}"
        )


# -- sizes ----------------------------------------------------------------------------------------
def _dims(config: ModelConfig) -> tuple[int, int, int, int]:
    """(qk_dim, v_dim, conv_dim, in_proj_dim), Megatron-Core's names: in_proj packs
    [q, k, v, z, beta, alpha], the conv [q, k, v]."""
    qk = config.linear_num_key_heads * config.linear_key_head_dim
    v = config.linear_num_value_heads * config.linear_value_head_dim
    conv = 2 * qk + v
    return qk, v, conv, conv + v + 2 * config.linear_num_value_heads


# -- initialization (Megatron-Core's GatedDeltaNet.reset_parameters) ----------------------------
def conv1d(shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig) -> torch.Tensor:
    """U(-1/sqrt(K), 1/sqrt(K)): nn.Conv1d's default for a depthwise conv (fan-in K), which
    Megatron keeps (its hybrid layers pass no conv_init)."""
    bound = config.linear_conv_kernel_dim**-0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


INIT_RULES = {
    "in_proj.weight": normal,
    "conv1d.weight": conv1d,
    "dt_bias": ones,  # Megatron's GDN: softplus(a + 1) at start
    "A_log": a_log,  # log(U(1, 16)), Megatron's A_init_range, as Mamba2's
    "out_norm.weight": ones,
    "out_proj.weight": output_projection,
}


# -- tensor parallelism: key and value heads over the ranks ------------------------------------
def _in_proj_parts(mixer: GatedDeltaNet) -> tuple[int, ...]:
    return tuple(mixer.in_proj_parts())


def _conv_parts(mixer: GatedDeltaNet) -> tuple[int, ...]:
    return mixer.in_proj_parts().conv


TENSOR_PARALLEL = TensorParallelPlan(
    parameters={
        # Per part q/k/v/z/beta/alpha: rank r holds key heads r*nk/tp.. and the value heads they
        # serve, as Megatron-Core's column-parallel in_proj does.
        "in_proj.weight": ColumnParallel(parts=_in_proj_parts),
        "conv1d.weight": SplitRows(parts=_conv_parts),  # per part q/k/v
        "dt_bias": SplitRows(),
        "A_log": SplitRows(),
        # One weight shared by every value head: whole on every rank, applied to its own heads.
        "out_norm.weight": ReplicatedSummedGradient(),
        "out_proj.weight": RowParallel(),
    },
    divisible=(
        ("linear_num_key_heads", "--linear-num-key-heads"),
        ("linear_num_value_heads", "--linear-num-value-heads"),
    ),
)


# -- cost -----------------------------------------------------------------------------------------
def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """nk = linear_num_key_heads, dk = linear_key_head_dim, nv = linear_num_value_heads,
    dv = linear_value_head_dim, K = linear_conv_kernel_dim, qk_dim = nk*dk, v_dim = nv*dv,
    conv_dim = 2*qk_dim + v_dim, in_dim = conv_dim + v_dim + 2*nv   (q, k, v, z, beta, alpha):

        in_proj                    2 * H * in_dim
        depthwise causal conv      2 * K * conv_dim
        gated delta rule           2 * 4 * nv * dk * dv
            four (dk x dv) products per token and value head, as Megatron-LM counts them
            ("KK^T, VK^T, S(a(I-bKK^T)), and SQ", written there
            as dv^2 for dk = dv); independent of the sequence length, like the recurrence
        out_proj                   2 * v_dim * H

    The L2 norms, gates, decays and the output norm are elementwise and count 0.
    """
    H = config.hidden_size
    _, v_dim, conv_dim, in_dim = _dims(config)
    rule = (
        2
        * 4
        * config.linear_num_value_heads
        * config.linear_key_head_dim
        * (config.linear_value_head_dim)
    )
    return 2 * H * in_dim + 2 * config.linear_conv_kernel_dim * conv_dim + rule + 2 * v_dim * H


def parameter_count(config: ModelConfig) -> int:
    H = config.hidden_size
    _, v_dim, conv_dim, in_dim = _dims(config)
    return (
        H * in_dim  # in_proj
        + conv_dim * config.linear_conv_kernel_dim  # conv1d (no bias)
        + 2 * config.linear_num_value_heads  # dt_bias, A_log
        + config.linear_value_head_dim  # out_norm
        + v_dim * H  # out_proj
    )


# -- Megatron-Core torch_dist: in_proj and conv1d saved per part ------------------------------
def _in_proj_sizes(config: ModelConfig) -> tuple[int, ...]:
    """Rows of in_proj's parts query, key, value, z, beta, alpha."""
    qk, v, _, _ = _dims(config)
    heads = config.linear_num_value_heads
    return (qk, qk, v, v, heads, heads)


def _conv_sizes(config: ModelConfig) -> tuple[int, ...]:
    """Channels of conv1d's parts query, key, value."""
    return _in_proj_sizes(config)[:3]


# GatedDeltaNet.sharded_state_dict saves in_proj as `.query .key .value .z .beta .alpha` and the
# conv's weight as `.query .key .value` (it has no bias here, Megatron's conv_bias=False).
_MCORE_PARTS = (
    split_keys(
        "self_attention.in_proj.weight",
        ("query", "key", "value", "z", "beta", "alpha"),
        _in_proj_sizes,
    ),
    split_keys("self_attention.conv1d.weight", ("query", "key", "value"), _conv_sizes),
)
_MCORE_SAME = tuple(
    rename(f"self_attention.{name}", f"self_attention.{name}")
    for name in ("dt_bias", "A_log", "out_norm.weight", "out_proj.weight")
)
_MCORE_LINEARS = (
    ExtraState("self_attention.in_proj", of="self_attention.in_proj.weight"),
    ExtraState("self_attention.out_proj", of="self_attention.out_proj.weight"),
)
MEGATRON_CORE = MegatronCoreLayout(
    key_maps={
        "local": (
            rename("input_layernorm.weight", "input_layernorm.weight"),
            *_MCORE_PARTS,
            *_MCORE_SAME,
        ),
        # TE's spec fuses the pre-norm into in_proj (TELayerNormColumnParallelLinear).
        "te": (
            rename("input_layernorm.weight", "self_attention.in_proj.layer_norm_weight"),
            *_MCORE_PARTS,
            *_MCORE_SAME,
        ),
    },
    extra_state={
        "local": _MCORE_LINEARS,
        # TE's spec builds out_norm as a TENorm, which saves one too.
        "te": (
            *_MCORE_LINEARS,
            ExtraState("self_attention.out_norm", of="self_attention.out_norm.weight"),
        ),
    },
    # in_proj and conv1d saved whole: one global tensor, the parts in Megatron's order.
    read_also=tuple(
        rename(key, key)
        for key in ("self_attention.in_proj.weight", "self_attention.conv1d.weight")
    ),
)

SPEC = MixerSpec(
    symbol="G",
    build=GatedDeltaNet,
    config_fields=(
        "hidden_size",
        "num_attention_heads",
        "linear_conv_kernel_dim",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "layernorm_epsilon",
    ),
    check_config=check_config,
    # Megatron-Core builds G as a TransformerLayer with GatedDeltaNet in its self_attention slot.
    slots=Slots(norm="input_layernorm", mixer="self_attention"),
    init_rules=INIT_RULES,
    tensor_parallel=TENSOR_PARALLEL,
    forward_flops_per_token=forward_flops_per_token,
    parameter_count=parameter_count,
    hf_nemotron_h=None,  # nemotron_h has no such layer (qwen3_next has; README)
    megatron_core=MEGATRON_CORE,
)
