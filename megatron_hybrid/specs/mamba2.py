"""`M`: Mamba2 (megatron_hybrid/layers/mamba2.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from megatron_hybrid.config_checks import ConfigError, divisors, positive
from megatron_hybrid.layers.mamba2 import Mamba2Mixer
from megatron_hybrid.specs.base import (
    ColumnParallel,
    ExtraState,
    ForeignLayout,
    MegatronCoreLayout,
    MixerSpec,
    RowParallel,
    Slots,
    SplitRows,
    TensorParallelPlan,
    rename,
    split_keys,
)
from megatron_hybrid.specs.init_rules import normal, ones, output_projection

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


def check_config(config: ModelConfig) -> None:
    positive(
        config,
        "mamba_state_dim",
        "mamba_head_dim",
        "mamba_num_groups",
        "mamba_conv_kernel",
        "mamba_chunk_size",
    )
    if config.mamba_num_heads is None:
        if (2 * config.hidden_size) % config.mamba_head_dim:
            raise ConfigError(
                f"2 * hidden_size={2 * config.hidden_size} is not divisible by mamba_head_dim="
                f"{config.mamba_head_dim}; set mamba_num_heads (--mamba-num-heads) explicitly"
            )
        config.mamba_num_heads = 2 * config.hidden_size // config.mamba_head_dim
    positive(config, "mamba_num_heads")
    if config.mamba_num_heads % config.mamba_num_groups:
        raise ConfigError(
            f"mamba_num_heads={config.mamba_num_heads} is not divisible by mamba_num_groups="
            f"{config.mamba_num_groups}; valid group counts: {divisors(config.mamba_num_heads)}"
        )
    if not 0 < config.mamba_dt_min <= config.mamba_dt_max:
        raise ConfigError(
            f"need 0 < mamba_dt_min <= mamba_dt_max, got {config.mamba_dt_min}, "
            f"{config.mamba_dt_max}"
        )


# -- initialization (Mamba2's defaults) --------------------------------------------------------
def a_log(shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig) -> torch.Tensor:
    """log(U(1, 16)): decay rates A = -exp(A_log) in [-16, -1]."""
    return torch.empty(shape).uniform_(1.0, 16.0, generator=generator).log()


def dt_bias(
    shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig
) -> torch.Tensor:
    """softplus^-1(dt), dt log-uniform in [mamba_dt_min, mamba_dt_max], floored at
    mamba_dt_init_floor."""
    lo, hi = math.log(config.mamba_dt_min), math.log(config.mamba_dt_max)
    dt = torch.empty(shape).uniform_(lo, hi, generator=generator).exp()
    dt = dt.clamp(min=config.mamba_dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def conv1d(shape: tuple[int, ...], generator: torch.Generator, config: ModelConfig) -> torch.Tensor:
    """U(-1/sqrt(K), 1/sqrt(K)): nn.Conv1d's default for a depthwise conv (fan-in K)."""
    bound = 1.0 / math.sqrt(config.mamba_conv_kernel)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


INIT_RULES = {
    "in_proj.weight": normal,
    "conv1d.weight": conv1d,
    "conv1d.bias": conv1d,
    "dt_bias": dt_bias,
    "A_log": a_log,
    "D": ones,
    "norm.weight": ones,
    "out_proj.weight": output_projection,
}


# -- tensor parallelism: heads and groups over the ranks -----------------------------------------
def _in_proj_parts(mixer: Mamba2Mixer) -> tuple[int, ...]:
    return tuple(mixer.in_proj_parts())


def _conv_parts(mixer: Mamba2Mixer) -> tuple[int, ...]:
    return mixer.in_proj_parts().conv


TENSOR_PARALLEL = TensorParallelPlan(
    parameters={
        "in_proj.weight": ColumnParallel(parts=_in_proj_parts),  # per part z/x/B/C/dt
        "conv1d.weight": SplitRows(parts=_conv_parts),  # per part x/B/C
        "conv1d.bias": SplitRows(parts=_conv_parts),
        "dt_bias": SplitRows(),
        "A_log": SplitRows(),
        "D": SplitRows(),
        "norm.weight": SplitRows(),  # the gated norm's groups are whole B/C groups
        "out_proj.weight": RowParallel(),
    },
    divisible=(
        ("mamba_num_heads", "--mamba-num-heads"),
        ("mamba_num_groups", "--mamba-num-groups"),
    ),
)


# -- cost -----------------------------------------------------------------------------------------
def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """h = mamba_num_heads, P = mamba_head_dim, G = mamba_num_groups, N = mamba_state_dim,
    K = mamba_conv_kernel, Q = mamba_chunk_size, d_inner = h*P, conv_dim = d_inner + 2*G*N,
    in_dim = 2*d_inner + 2*G*N + h   (z, x, B, C, dt):

        in_proj                    2 * H * in_dim
        depthwise causal conv      2 * K * conv_dim
        SSD, chunked (Mamba2 paper, listing 1), what the algorithm computes averaged per token.
        A chunk of Q positions does, per B/C group or per head, one (Q x Q) or (Q x P x N)
        matmul per step below; dividing the chunk's cost by its Q tokens:
          scores C_l . B_s         (Q x N)@(N x Q) per group:     2 * Q * N * G
          scores @ (dt * x)        (Q x Q)@(Q x P) per head:      2 * Q * P * h
          chunk states x^T B       (P x Q)@(Q x N) per head:      2 * P * N * h
          state -> output C state  (Q x N)@(N x P) per head:      2 * P * N * h
          carry states over chunks one multiply-add of the P x N state per chunk per head
                                   (the linear scan of the CUDA kernels):  2 * P * N * h / Q
        The full Q x Q blocks are counted although half is masked (causal), as the chunked
        algorithm computes them. Padding of a last partial chunk is not counted. The eager CPU
        reference carries states with a (chunks x chunks) segment-sum matmul instead; the
        formula counts the linear scan, the algorithm's essential work.
        out_proj                   2 * d_inner * H
    """
    H = config.hidden_size
    h, P = config.mamba_num_heads, config.mamba_head_dim
    G, N = config.mamba_num_groups, config.mamba_state_dim
    Q, K = config.mamba_chunk_size, config.mamba_conv_kernel
    d_inner = h * P
    in_proj = 2 * H * config.mamba_in_proj_dim
    conv = 2 * K * config.mamba_conv_dim
    ssd = (
        2 * Q * N * G  # C . B scores per group
        + 2 * Q * P * h  # scores @ x per head
        + 2 * P * N * h  # chunk states
        + 2 * P * N * h  # states -> outputs
        + 2 * P * N * h / Q  # carry states over chunks
    )
    out_proj = 2 * d_inner * H
    return in_proj + conv + ssd + out_proj


def parameter_count(config: ModelConfig) -> int:
    H = config.hidden_size
    h, d_inner, conv_dim = config.mamba_num_heads, config.mamba_d_inner, config.mamba_conv_dim
    return (
        H * config.mamba_in_proj_dim  # in_proj
        + conv_dim * config.mamba_conv_kernel
        + conv_dim  # conv1d weight + bias
        + 3 * h  # dt_bias, A_log, D
        + d_inner  # gated RMSNorm weight
        + d_inner * H  # out_proj
    )


# -- Hugging Face nemotron_h: the same names ---------------------------------------------------
_HF_SAME_NAMES = (
    "norm.weight",
    "mixer.in_proj.weight",
    "mixer.conv1d.weight",
    "mixer.conv1d.bias",
    "mixer.A_log",
    "mixer.D",
    "mixer.dt_bias",
    "mixer.norm.weight",
    "mixer.out_proj.weight",
)
HF_NEMOTRON_H = ForeignLayout(
    layer_type="linear_attention",
    key_maps=tuple(rename(key, key) for key in _HF_SAME_NAMES),
)


# -- Megatron-Core torch_dist: in_proj and conv1d saved per part ------------------------------
def _in_proj_sizes(config: ModelConfig) -> tuple[int, ...]:
    """Rows of in_proj's parts z, x, B, C, dt."""
    d_inner, group_state = config.mamba_d_inner, config.mamba_num_groups * config.mamba_state_dim
    return (d_inner, d_inner, group_state, group_state, config.mamba_num_heads)


def _conv_sizes(config: ModelConfig) -> tuple[int, ...]:
    """Channels of conv1d's parts x, B, C."""
    return _in_proj_sizes(config)[1:4]


# MambaMixer.sharded_state_dict saves in_proj as `.z .x .B .C .dt` and conv1d as `.x .B .C`,
# each part a global tensor whatever the tensor-parallel size.
_MCORE_PARTS = (
    split_keys("mixer.in_proj.weight", ("z", "x", "B", "C", "dt"), _in_proj_sizes),
    split_keys("mixer.conv1d.weight", ("x", "B", "C"), _conv_sizes),
    split_keys("mixer.conv1d.bias", ("x", "B", "C"), _conv_sizes),
)
_MCORE_SAME = tuple(
    rename(key, key)
    for key in (
        "mixer.A_log",
        "mixer.D",
        "mixer.dt_bias",
        "mixer.norm.weight",
        "mixer.out_proj.weight",
    )
)
_MCORE_LINEARS = (
    ExtraState("mixer.in_proj", of="mixer.in_proj.weight"),
    ExtraState("mixer.out_proj", of="mixer.out_proj.weight"),
)
MEGATRON_CORE = MegatronCoreLayout(
    key_maps={
        "local": (rename("norm.weight", "norm.weight"), *_MCORE_PARTS, *_MCORE_SAME),
        # TE's spec fuses the pre-norm into in_proj (TELayerNormColumnParallelLinear).
        "te": (
            rename("norm.weight", "mixer.in_proj.layer_norm_weight"),
            *_MCORE_PARTS,
            *_MCORE_SAME,
        ),
    },
    extra_state={"local": _MCORE_LINEARS, "te": _MCORE_LINEARS},
    # in_proj and conv1d saved whole: one global tensor, the parts in the canonical order.
    read_also=tuple(
        rename(key, key)
        for key in ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias")
    ),
)

SPEC = MixerSpec(
    symbol="M",
    build=Mamba2Mixer,
    config_fields=(
        "hidden_size",
        "mamba_state_dim",
        "mamba_head_dim",
        "mamba_num_groups",
        "mamba_num_heads",
        "mamba_conv_kernel",
        "mamba_chunk_size",
        "mamba_dt_min",
        "mamba_dt_max",
        "mamba_dt_init_floor",
        "mamba_dt_floor",
        "mamba_dt_ceiling",
        "layernorm_epsilon",
    ),
    check_config=check_config,
    # A stand-alone Mamba layer's names in Megatron's checkpoints.
    slots=Slots(norm="norm", mixer="mixer"),
    init_rules=INIT_RULES,
    tensor_parallel=TENSOR_PARALLEL,
    forward_flops_per_token=forward_flops_per_token,
    parameter_count=parameter_count,
    hf_nemotron_h=HF_NEMOTRON_H,
    megatron_core=MEGATRON_CORE,
)
