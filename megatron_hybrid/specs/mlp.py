"""`-`: dense MLP, squared ReLU or SwiGLU (megatron_hybrid/layers/mlp.py). MoE's experts and
shared expert reuse its cost formulas and tensor-parallel plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from megatron_hybrid.kernels.activations.eager import fc1_width
from megatron_hybrid.layers.mlp import MLP
from megatron_hybrid.specs.base import (
    ColumnParallel,
    ExtraState,
    ForeignLayout,
    MegatronCoreLayout,
    MixerSpec,
    RowParallel,
    Slots,
    TensorParallelPlan,
    checked_for_every_pattern,
    rename,
)
from megatron_hybrid.specs.init_rules import normal, output_projection

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig
    from megatron_hybrid.kernels.registry import BoundKernels


def build(config: ModelConfig, kernels: BoundKernels | None = None) -> MLP:
    return MLP(config.hidden_size, config.ffn_hidden_size, config.activation, kernels)


def mlp_forward_flops(hidden: int, ffn: int, activation: str) -> int:
    """linear_fc1 + linear_fc2: 2 * H * F1 + 2 * F * H, F1 = 2*F for SwiGLU (gate and up
    packed) else F."""
    return 2 * hidden * fc1_width(ffn, activation) + 2 * ffn * hidden


def mlp_parameters(hidden: int, ffn: int, activation: str) -> int:
    return hidden * fc1_width(ffn, activation) + ffn * hidden


def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """F = ffn_hidden_size: `mlp_forward_flops(H, F, activation)`."""
    return mlp_forward_flops(config.hidden_size, config.ffn_hidden_size, config.activation)


def parameter_count(config: ModelConfig) -> int:
    return mlp_parameters(config.hidden_size, config.ffn_hidden_size, config.activation)


def _fc1_parts(mlp: nn.Module) -> tuple[int, ...] | None:
    """SwiGLU's fc1 packs [gate; up]: each rank gets its gate rows and the matching up rows."""
    if mlp.activation != "swiglu":
        return None
    ffn = mlp.linear_fc2.in_features
    return (ffn, ffn)


TENSOR_PARALLEL = TensorParallelPlan(
    parameters={
        "linear_fc1.weight": ColumnParallel(parts=_fc1_parts),
        "linear_fc2.weight": RowParallel(),
    },
    divisible=(("ffn_hidden_size", "--ffn-hidden-size"),),
)

# SwiGLU's fc1 is saved as [gate; up] whatever the tensor-parallel size
# (apply_swiglu_sharded_factory places each rank's two halves at their global offsets).
_MCORE_SAME = (
    rename("mlp.linear_fc1.weight", "mlp.linear_fc1.weight"),
    rename("mlp.linear_fc2.weight", "mlp.linear_fc2.weight"),
)
_MCORE_LINEARS = (
    ExtraState("mlp.linear_fc1", of="mlp.linear_fc1.weight"),
    ExtraState("mlp.linear_fc2", of="mlp.linear_fc2.weight"),
)
MEGATRON_CORE = MegatronCoreLayout(
    key_maps={
        "local": (rename("pre_mlp_layernorm.weight", "pre_mlp_layernorm.weight"), *_MCORE_SAME),
        # TE's spec fuses the pre-norm into linear_fc1 (TELayerNormColumnParallelLinear).
        "te": (
            rename("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
            *_MCORE_SAME,
        ),
    },
    extra_state={"local": _MCORE_LINEARS, "te": _MCORE_LINEARS},
)

SPEC = MixerSpec(
    symbol="-",
    build=build,
    config_fields=("hidden_size", "ffn_hidden_size", "activation"),
    # ffn_hidden_size and activation are checked for every pattern: MoE reads them too.
    check_config=checked_for_every_pattern,
    slots=Slots(norm="pre_mlp_layernorm", mixer="mlp"),  # Megatron's names
    init_rules={"linear_fc1.weight": normal, "linear_fc2.weight": output_projection},
    tensor_parallel=TENSOR_PARALLEL,
    forward_flops_per_token=forward_flops_per_token,
    parameter_count=parameter_count,
    hf_nemotron_h=ForeignLayout(
        layer_type="mlp",
        key_maps=(
            rename("pre_mlp_layernorm.weight", "norm.weight"),
            rename("mlp.linear_fc1.weight", "mixer.up_proj.weight"),
            rename("mlp.linear_fc2.weight", "mixer.down_proj.weight"),
        ),
    ),
    megatron_core=MEGATRON_CORE,
)
