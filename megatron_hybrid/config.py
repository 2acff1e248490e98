"""`ModelConfig`: every architectural hyper-parameter of a hybrid model, with Megatron's names.

All validation of sizes lives in `ModelConfig.__post_init__`, so a bad combination fails when
the config is made (before any module is built or any data is read), with a message naming the
fields, their values and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_hybrid.pattern import HybridPattern, parse_hybrid_pattern

ACTIVATIONS = ("squared_relu", "swiglu")
POSITION_EMBEDDINGS = ("rope", "none")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")


class ConfigError(ValueError):
    """A model configuration whose sizes do not fit together."""


@dataclass
class ModelConfig:
    """Architecture of a hybrid decoder. Field names follow Megatron-LM's arguments."""

    hybrid_layer_pattern: str  # e.g. "M-M-[*-]M-"
    hidden_size: int
    vocab_size: int  # rows of the embedding (already padded, see pad_vocab_size)
    ffn_hidden_size: int | None = None  # MLP width; default 4 * hidden_size

    # Attention (`*`)
    num_attention_heads: int | None = None
    num_query_groups: int | None = None  # GQA key/value groups; default num_attention_heads
    kv_channels: int | None = None  # per-head dim; default hidden_size // num_attention_heads
    position_embedding_type: str = "none"  # "rope" or "none" (Nemotron-H uses none)
    rotary_base: float = 10000.0

    # Mamba2 (`M`)
    mamba_state_dim: int = 128  # N, SSM state size per group
    mamba_head_dim: int = 64  # P
    mamba_num_groups: int = 8  # G, groups of B/C shared by heads
    mamba_num_heads: int | None = None  # default 2 * hidden_size // mamba_head_dim (expand 2)
    mamba_conv_kernel: int = 4  # depthwise causal conv width
    mamba_chunk_size: int = 128  # SSD chunk length
    mamba_dt_min: float = 0.001  # dt init range (log-uniform) and floor, as Mamba2
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    # Forward clamp of dt = softplus(dt + dt_bias) to [floor, ceiling] (None: no ceiling).
    # Megatron does not clamp (0, None); HF nemotron_h does (checkpointing/hf_nemotron_h.py).
    mamba_dt_floor: float = 0.0
    mamba_dt_ceiling: float | None = None

    # MLP (`-`) and experts
    activation: str = "squared_relu"  # "squared_relu" or "swiglu"

    # MoE (`E`)
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # per-expert width; default ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None  # shared expert width; None: none
    moe_router_score_function: str = "softmax"  # "softmax" or "sigmoid"
    moe_router_pre_softmax: bool = False  # keep full-softmax top-k probs (no renormalization)
    moe_router_topk_scaling_factor: float | None = None  # scales routing weights (Nemotron-H)
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing bias, for choice only
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0  # switch load-balancing loss coefficient

    # Shared
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = False  # Megatron ties by default

    pattern: HybridPattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pattern = parse_hybrid_pattern(self.hybrid_layer_pattern)
        self.hybrid_layer_pattern = str(self.pattern)
        _positive(self, "hidden_size", "vocab_size", "layernorm_epsilon", "init_method_std")
        _choice(self, "activation", ACTIVATIONS)
        _choice(self, "position_embedding_type", POSITION_EMBEDDINGS)
        _choice(self, "moe_router_score_function", ROUTER_SCORE_FUNCTIONS)
        self._check_dt_clamp()
        counts = self.pattern.layer_counts()
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        _positive(self, "ffn_hidden_size")
        if counts["*"]:
            self._check_attention()
        if counts["M"]:
            self._check_mamba()
        if counts["E"]:
            self._check_moe()

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C packed."""
        return self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim

    @property
    def mamba_in_proj_dim(self) -> int:
        """in_proj output, packed [z, x, B, C, dt]."""
        return 2 * self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim + (
            self.mamba_num_heads
        )

    @property
    def mamba_dt_limit(self) -> tuple[float, float]:
        """(low, high) that Mamba2 clamps dt = softplus(dt + dt_bias) to; (0, inf): no clamp."""
        ceiling = math.inf if self.mamba_dt_ceiling is None else self.mamba_dt_ceiling
        return (self.mamba_dt_floor, ceiling)

    @property
    def tie_word_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    def to_dict(self) -> dict:
        """The constructor arguments, JSON-serializable (checkpoints record this)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    # -- validation ------------------------------------------------------------------------
    def _check_attention(self) -> None:
        if self.num_attention_heads is None:
            raise ConfigError(
                f"pattern {self.hybrid_layer_pattern!r} has attention ('*') layers: "
                "set num_attention_heads (--num-attention-heads)"
            )
        _positive(self, "num_attention_heads")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        _positive(self, "num_query_groups")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}: every query group must hold the "
                f"same number of heads; valid group counts: "
                f"{_divisors(self.num_attention_heads)}"
            )
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels (--kv-channels) explicitly "
                    "or pick a head count that divides hidden_size"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        _positive(self, "kv_channels")
        if self.position_embedding_type == "rope" and self.kv_channels % 2:
            raise ConfigError(
                f"rotary embeddings need an even kv_channels, got {self.kv_channels}"
            )

    def _check_mamba(self) -> None:
        _positive(self, "mamba_state_dim", "mamba_head_dim", "mamba_num_groups",
                  "mamba_conv_kernel", "mamba_chunk_size")
        if self.mamba_num_heads is None:
            if (2 * self.hidden_size) % self.mamba_head_dim:
                raise ConfigError(
                    f"2 * hidden_size={2 * self.hidden_size} is not divisible by mamba_head_dim="
                    f"{self.mamba_head_dim}; set mamba_num_heads (--mamba-num-heads) explicitly"
                )
            self.mamba_num_heads = 2 * self.hidden_size // self.mamba_head_dim
        _positive(self, "mamba_num_heads")
        if self.mamba_num_heads % self.mamba_num_groups:
            raise ConfigError(
                f"mamba_num_heads={self.mamba_num_heads} is not divisible by mamba_num_groups="
                f"{self.mamba_num_groups}; valid group counts: {_divisors(self.mamba_num_heads)}"
            )
        if not 0 < self.mamba_dt_min <= self.mamba_dt_max:
            raise ConfigError(
                f"need 0 < mamba_dt_min <= mamba_dt_max, got {self.mamba_dt_min}, "
                f"{self.mamba_dt_max}"
            )

    def _check_dt_clamp(self) -> None:
        # Checked for every pattern: to_dict() must stay plain JSON (an infinite ceiling is None).
        floor, ceiling = self.mamba_dt_floor, self.mamba_dt_ceiling
        if not (math.isfinite(floor) and floor >= 0):
            raise ConfigError(
                f"mamba_dt_floor (--mamba-dt-floor) must be a finite number >= 0, got {floor!r}; "
                "0 means no floor"
            )
        if ceiling == math.inf:
            self.mamba_dt_ceiling = None
        elif ceiling is not None and not ceiling > floor:  # also rejects nan and -inf
            raise ConfigError(
                f"mamba_dt_ceiling (--mamba-dt-ceiling) must be above mamba_dt_floor={floor}, "
                f"got {ceiling!r}; valid: a larger number, or inf / None for no ceiling"
            )

    def _check_moe(self) -> None:
        if self.num_moe_experts is None:
            raise ConfigError(
                f"pattern {self.hybrid_layer_pattern!r} has MoE ('E') layers: set "
                "num_moe_experts (--num-experts)"
            )
        _positive(self, "num_moe_experts", "moe_router_topk")
        if self.moe_router_topk > self.num_moe_experts:
            raise ConfigError(
                f"moe_router_topk={self.moe_router_topk} exceeds num_moe_experts="
                f"{self.num_moe_experts}; top-k must be between 1 and the number of experts"
            )
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        _positive(self, "moe_ffn_hidden_size")
        if self.moe_shared_expert_intermediate_size is not None:
            _positive(self, "moe_shared_expert_intermediate_size")
        if self.moe_aux_loss_coeff < 0:
            raise ConfigError(f"moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")


def pad_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Round a tokenizer's vocabulary up as Megatron does (--make-vocab-size-divisible-by)."""
    if divisible_by <= 0:
        raise ConfigError(f"make_vocab_size_divisible_by must be positive, got {divisible_by}")
    return -(-vocab_size // divisible_by) * divisible_by


def _positive(config: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _choice(config: ModelConfig, name: str, valid: tuple[str, ...]) -> None:
    if getattr(config, name) not in valid:
        raise ConfigError(f"{name}={getattr(config, name)!r} is not one of {', '.join(valid)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
