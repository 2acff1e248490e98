"""`E`: mixture of experts with an optional shared expert (megatron_hybrid/layers/moe.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from megatron_hybrid.config_checks import ConfigError, divisors, positive
from megatron_hybrid.layers.moe import MoELayer
from megatron_hybrid.specs.base import (
    ExtraState,
    ForeignLayout,
    KeyMap,
    KeyMappingError,
    MegatronCoreLayout,
    MixerSpec,
    Replicated,
    Slots,
    SplitElsewhere,
    TensorParallelPlan,
    per_item_keys,
    rename,
)
from megatron_hybrid.specs.init_rules import normal, output_projection, zeros
from megatron_hybrid.specs.mlp import mlp_forward_flops, mlp_parameters

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


def check_config(config: ModelConfig) -> None:
    if config.num_moe_experts is None:
        raise ConfigError(
            f"pattern {config.hybrid_layer_pattern!r} has MoE ('E') layers: set "
            "num_moe_experts (--num-experts)"
        )
    positive(config, "num_moe_experts", "moe_router_topk")
    if config.moe_router_topk > config.num_moe_experts:
        raise ConfigError(
            f"moe_router_topk={config.moe_router_topk} exceeds num_moe_experts="
            f"{config.num_moe_experts}; top-k must be between 1 and the number of experts"
        )
    if config.moe_ffn_hidden_size is None:
        config.moe_ffn_hidden_size = config.ffn_hidden_size
    positive(config, "moe_ffn_hidden_size")
    if config.moe_shared_expert_intermediate_size is not None:
        positive(config, "moe_shared_expert_intermediate_size")
    if config.moe_aux_loss_coeff < 0:
        raise ConfigError(f"moe_aux_loss_coeff must be >= 0, got {config.moe_aux_loss_coeff}")
    if config.moe_latent_size is not None:
        positive(config, "moe_latent_size")
    _check_group_limited_routing(config)


def _check_group_limited_routing(config: ModelConfig) -> None:
    """Megatron-Core's checks of --moe-router-num-groups / --moe-router-group-topk, and three of
    its silent failures made errors: one flag without the other (Megatron ignores it), a top-k
    that cannot fill from the chosen groups, and groups chosen by the sum of their top 0."""
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is None and group_topk is None:
        return
    if groups is None or group_topk is None:
        raise ConfigError(
            f"group-limited routing needs both --moe-router-num-groups and "
            f"--moe-router-group-topk, got moe_router_num_groups={groups} and "
            f"moe_router_group_topk={group_topk}: set both --moe-router-num-groups and "
            "--moe-router-group-topk, or neither"
        )
    positive(config, "moe_router_num_groups", "moe_router_group_topk")
    experts, topk = config.num_moe_experts, config.moe_router_topk
    if experts % groups:
        raise ConfigError(
            f"--num-experts {experts} is not divisible by --moe-router-num-groups {groups}; "
            f"valid group counts: {', '.join(map(str, divisors(experts)))}"
        )
    if group_topk > groups:
        raise ConfigError(
            f"--moe-router-group-topk {group_topk} exceeds --moe-router-num-groups {groups}; "
            f"valid: 1 to {groups}"
        )
    if topk < group_topk < groups:  # (keeping every group, the group scores do not matter)
        raise ConfigError(
            f"--moe-router-topk {topk} is below --moe-router-group-topk {group_topk}: a group is "
            f"scored by the sum of its top (topk // group_topk) = {topk // group_topk} scores; "
            f"valid: --moe-router-group-topk 1 to {min(topk, groups)}"
        )
    reachable = group_topk * (experts // groups)
    if topk > reachable:
        raise ConfigError(
            f"--moe-router-topk {topk} exceeds the {reachable} experts of the "
            f"--moe-router-group-topk {group_topk} groups each token may use "
            f"({experts // groups} experts per group); valid: top-k up to {reachable}, or "
            "more groups per token"
        )


def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """E = num_moe_experts, k = moe_router_topk, Fe = moe_ffn_hidden_size,
    Fs = moe_shared_expert_intermediate_size, L = moe_latent_size, MLP_W(F) = the dense MLP's
    formula at input width W (specs/mlp.py); as Megatron's moe_layer_flops:

        router                       2 * H * E
        k routed experts             k * MLP_H(Fe), latent: k * MLP_L(Fe)   (the chosen ones)
        latent projections (if any)  2 * H * L + 2 * L * H
        shared expert (if any)       MLP_H(Fs)

    Group-limited routing changes which experts run, not how many."""
    H = config.hidden_size
    flops = 2 * H * config.num_moe_experts
    flops += config.moe_router_topk * mlp_forward_flops(
        config.moe_expert_input_size, config.moe_ffn_hidden_size, config.activation
    )
    if config.moe_latent_size is not None:
        flops += 2 * (2 * H * config.moe_latent_size)
    if config.moe_shared_expert_intermediate_size is not None:
        flops += mlp_forward_flops(H, config.moe_shared_expert_intermediate_size, config.activation)
    return flops


def parameter_count(config: ModelConfig) -> int:
    """Router E*H, E experts (at the latent width in a latent MoE), the latent projections
    2*H*L, the shared expert; the expert bias and token counts are buffers."""
    H, E = config.hidden_size, config.num_moe_experts
    params = E * H + E * mlp_parameters(
        config.moe_expert_input_size, config.moe_ffn_hidden_size, config.activation
    )
    if config.moe_latent_size is not None:
        params += 2 * H * config.moe_latent_size
    if config.moe_shared_expert_intermediate_size is not None:
        params += mlp_parameters(H, config.moe_shared_expert_intermediate_size, config.activation)
    return params


# -- Hugging Face nemotron_h ----------------------------------------------------------------------
def _router_keys(config: ModelConfig) -> tuple[str, ...]:
    if config.moe_router_enable_expert_bias:
        return ("mlp.router.weight", "mlp.router.expert_bias")
    return ("mlp.router.weight",)


def router_to_hf(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
    """HF always has an expert-score bias: ours, or zeros (no bias) in float32 as HF keeps it."""
    weight, *bias = tensors
    if not bias:
        bias = [torch.zeros(config.num_moe_experts, dtype=torch.float32, device=weight.device)]
    return [weight, *bias]


def router_from_hf(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
    weight, bias = tensors
    if config.moe_router_enable_expert_bias:
        return [weight, bias]
    if bool((bias != 0).any()):
        raise KeyMappingError(
            "e_score_correction_bias is not zero but the config has "
            "moe_router_enable_expert_bias=False, so the expert choice would differ; import "
            "with moe_router_enable_expert_bias=True"
        )
    return [weight]


def _hf_expert_keys(config: ModelConfig) -> tuple[str, ...]:
    """One up and one down projection per expert, expert by expert."""
    return tuple(
        f"mixer.experts.{j}.{proj}.weight"
        for j in range(config.num_moe_experts)
        for proj in ("up_proj", "down_proj")
    )


def experts_to_hf(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
    """Stacked fc1 [E, F, H] and fc2 [E, H, F] -> up_j [F, H], down_j [H, F] per expert j."""
    fc1, fc2 = tensors
    return [w for j in range(config.num_moe_experts) for w in (fc1[j], fc2[j])]


def experts_from_hf(tensors: Sequence[torch.Tensor], config: ModelConfig) -> list[torch.Tensor]:
    return [torch.stack(list(tensors[0::2])), torch.stack(list(tensors[1::2]))]


def _latent_keys(mixer: str) -> Callable[[ModelConfig], tuple[str, ...]]:
    """The latent projections' keys under module `mixer` (ours "mlp", HF's "mixer"), if any."""

    def keys(config: ModelConfig) -> tuple[str, ...]:
        if config.moe_latent_size is None:
            return ()
        return (f"{mixer}.fc1_latent_proj.weight", f"{mixer}.fc2_latent_proj.weight")

    return keys


HF_NEMOTRON_H = ForeignLayout(
    layer_type="moe",
    key_maps=(
        rename("pre_mlp_layernorm.weight", "norm.weight"),
        KeyMap(
            _router_keys,
            ("mixer.gate.weight", "mixer.gate.e_score_correction_bias"),
            to_theirs=router_to_hf,
            to_ours=router_from_hf,
        ),
        KeyMap(
            ("mlp.experts.linear_fc1.weight", "mlp.experts.linear_fc2.weight"),
            _hf_expert_keys,
            to_theirs=experts_to_hf,
            to_ours=experts_from_hf,
        ),
        rename("mlp.shared_experts.linear_fc1.weight", "mixer.shared_experts.up_proj.weight"),
        rename("mlp.shared_experts.linear_fc2.weight", "mixer.shared_experts.down_proj.weight"),
        KeyMap(_latent_keys("mlp"), _latent_keys("mixer")),
    ),
)


# -- Megatron-Core torch_dist ----------------------------------------------------------------------
def _num_experts(config: ModelConfig) -> int:
    return config.num_moe_experts


_EXPERT_WEIGHTS = ("linear_fc1.weight", "linear_fc2.weight")
# SequentialMLP and TEGroupedMLP both save each expert weight as one [E, ...] tensor under
# `experts.experts.` (the expert index a prepended axis); SwiGLU's fc1 per expert [gate; up].
_LATENT_PROJECTIONS = ("fc1_latent_proj", "fc2_latent_proj")
_MCORE_SAME = (
    rename("pre_mlp_layernorm.weight", "pre_mlp_layernorm.weight"),
    rename("mlp.router.weight", "mlp.router.weight"),
    rename("mlp.router.expert_bias", "mlp.router.expert_bias"),
    *(rename(f"mlp.{p}.weight", f"mlp.{p}.weight") for p in _LATENT_PROJECTIONS),
    *(rename(f"mlp.experts.{w}", f"mlp.experts.experts.{w}") for w in _EXPERT_WEIGHTS),
    *(rename(f"mlp.shared_experts.{w}", f"mlp.shared_experts.{w}") for w in _EXPERT_WEIGHTS),
)
_MCORE_LINEARS = (
    *(
        ExtraState(f"mlp.experts.experts.{w[: -len('.weight')]}", f"mlp.experts.{w}", _num_experts)
        for w in _EXPERT_WEIGHTS
    ),
    *(
        ExtraState(f"mlp.shared_experts.{w[: -len('.weight')]}", f"mlp.shared_experts.{w}")
        for w in _EXPERT_WEIGHTS
    ),
    # The latent projections are TELinear in every layer spec (moe_layer.py).
    *(ExtraState(f"mlp.{p}", f"mlp.{p}.weight") for p in _LATENT_PROJECTIONS),
)
MEGATRON_CORE = MegatronCoreLayout(
    # The MoE layer keeps its own pre-norm in both specs (TENorm in TE's).
    key_maps={"local": _MCORE_SAME, "te": _MCORE_SAME},
    extra_state={
        "local": _MCORE_LINEARS,
        "te": (ExtraState("pre_mlp_layernorm", of="pre_mlp_layernorm.weight"), *_MCORE_LINEARS),
    },
    # One tensor per expert: `experts.experts.{j}.` is how Megatron-Core saves them with
    # singleton local shards, `experts.local_experts.{j}.` SequentialMLP's module names.
    read_also=tuple(
        per_item_keys(f"mlp.experts.{w}", f"mlp.experts.{where}.{{}}.{w}", _num_experts)
        for where in ("experts", "local_experts")
        for w in _EXPERT_WEIGHTS
    ),
)

_EXPERT_PARALLEL = SplitElsewhere("megatron_hybrid/parallel/expert_parallel.py")

SPEC = MixerSpec(
    symbol="E",
    build=MoELayer,
    config_fields=(
        "hidden_size",
        "ffn_hidden_size",
        "activation",
        "num_moe_experts",
        "moe_router_topk",
        "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size",
        "moe_router_score_function",
        "moe_router_pre_softmax",
        "moe_router_topk_scaling_factor",
        "moe_router_enable_expert_bias",
        "moe_router_bias_update_rate",
        "moe_aux_loss_coeff",
        "moe_latent_size",
        "moe_expert_input_size",
        "moe_router_num_groups",
        "moe_router_group_topk",
    ),
    check_config=check_config,
    slots=Slots(norm="pre_mlp_layernorm", mixer="mlp"),  # Megatron's names
    init_rules={
        "router.weight": normal,
        "router.expert_bias": zeros,
        "experts.linear_fc1.weight": normal,
        "experts.linear_fc2.weight": output_projection,
        "shared_experts.linear_fc1.weight": normal,
        "shared_experts.linear_fc2.weight": output_projection,
        # Megatron-Core's MoELayer: init_method and output_layer_init_method.
        "fc1_latent_proj.weight": normal,
        "fc2_latent_proj.weight": output_projection,
    },
    # Experts and the shared expert are split, over tp and ep, by expert parallelism, which
    # also checks the sizes (expert_parallel_problems). The router stays whole, so every rank
    # routes alike; the MoE's output is therefore replicated, not reduced. The latent
    # projections are whole on every rank too, as Megatron-Core's (parallel_mode="duplicated"):
    # they read the replicated input and write the replicated output, so they need no
    # collective, where splitting them would add one on each side of the experts (whose tp
    # split is over their ffn width, not the latent width); they are 2*H*L of a layer's weights.
    tensor_parallel=TensorParallelPlan(
        parameters={
            "router.weight": Replicated(),
            "fc1_latent_proj.weight": Replicated(),
            "fc2_latent_proj.weight": Replicated(),
            "experts.linear_fc1.weight": _EXPERT_PARALLEL,
            "experts.linear_fc2.weight": _EXPERT_PARALLEL,
            "shared_experts.linear_fc1.weight": _EXPERT_PARALLEL,
            "shared_experts.linear_fc2.weight": _EXPERT_PARALLEL,
        }
    ),
    forward_flops_per_token=forward_flops_per_token,
    parameter_count=parameter_count,
    hf_nemotron_h=HF_NEMOTRON_H,
    megatron_core=MEGATRON_CORE,
)
