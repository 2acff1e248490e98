"""`ModelConfig`: every architectural hyper-parameter of a hybrid model, with Megatron's names.

All validation of sizes runs in `ModelConfig.__post_init__`: the checks every pattern needs
here, and each mixer's own (`MixerSpec.check_config`, megatron_hybrid/specs/) for the symbols of
the pattern. A bad combination thus fails when the config is made (before any module is built or
any data is read), with a message naming the fields, their values and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_hybrid.config_checks import ConfigError, choice, positive
from megatron_hybrid.pattern import HybridPattern, parse_hybrid_pattern
from megatron_hybrid.specs import SPECS

ACTIVATIONS = ("squared_relu", "swiglu")
POSITION_EMBEDDINGS = ("rope", "none")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")

__all__ = ["ConfigError", "ModelConfig", "pad_vocab_size"]


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

    # Multi-latent attention (`+`, and `D`, which is MLA with sparse key selection). Sizes left
    # None are derived in megatron_hybrid/specs/mla.py from d = kv_channels, else
    # hidden_size // num_attention_heads.
    q_lora_rank: int | None = None  # query latent; None: no query compression (linear_q_proj)
    kv_lora_rank: int | None = None  # key/value latent; default 4 * d
    qk_head_dim: int | None = None  # per-head q/k dims without rope; default d
    qk_pos_emb_head_dim: int | None = None  # per-head rope dims; default d / 2, even
    v_head_dim: int | None = None  # per-head value dims; default d
    qk_layernorm: bool = False  # RMSNorm on the query and key/value latents (DeepSeek's)
    rope_type: str | None = None  # "rope" or "yarn" (MLA's default, as Megatron's)
    rotary_scaling_factor: float = 1.0  # YaRN context extension factor (1: plain rope)
    mscale: float = 1.0  # YaRN attention-temperature coefficients
    mscale_all_dim: float = 0.0
    original_max_position_embeddings: int = 4096  # YaRN: the context before extension
    beta_fast: float = 32.0  # YaRN: rotations bounding the interpolation ramp
    beta_slow: float = 1.0

    # DeepSeek sparse attention (`D`): MLA whose queries each attend to the top-k keys of a
    # lightning indexer. Sizes left None are derived in megatron_hybrid/specs/dsa.py.
    dsa_indexer_n_heads: int | None = None  # default num_attention_heads // 2 (at least 1)
    dsa_indexer_head_dim: int | None = None  # default qk_head_dim
    dsa_indexer_topk: int | None = None  # keys per query; default 2048 (DeepSeek-V3.2's)
    dsa_indexer_loss_coeff: float = 0.0  # KL loss training the indexer; 0: off (Megatron's)
    dsa_indexer_use_sparse_loss: bool = False  # that loss over the selected keys only

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

    # Gated DeltaNet (`G`), Megatron-Core's linear_* fields. Unset sizes derive from the
    # attention sizes (megatron_hybrid/specs/gated_delta_net.py): Qwen3-Next's ratios.
    linear_conv_kernel_dim: int = 4  # depthwise causal conv width over q, k, v
    linear_key_head_dim: int | None = None  # default hidden_size // num_attention_heads
    linear_value_head_dim: int | None = None  # default linear_key_head_dim
    linear_num_key_heads: int | None = None  # q/k heads; default num_attention_heads
    linear_num_value_heads: int | None = None  # v/gate heads; default 2 * linear_num_key_heads

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
    # Latent MoE: routed experts run at this width between fc1_latent_proj (hidden -> latent)
    # and fc2_latent_proj (latent -> hidden); the router and shared experts stay at hidden_size.
    moe_latent_size: int | None = None
    # Group-limited routing: experts split into moe_router_num_groups groups; each token routes
    # to experts of its moe_router_group_topk best groups only (both None: no groups).
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None

    # Multi-token prediction (the pattern's '/' parts; megatron_hybrid/mtp.py)
    mtp_num_layers: int | None = None  # MTP depths: the pattern's '/' parts (a value must agree)
    mtp_loss_scaling_factor: float = 0.1  # weight of the MTP loss (mean over depths)

    # Shared
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = False  # Megatron ties by default

    pattern: HybridPattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pattern = parse_hybrid_pattern(self.hybrid_layer_pattern)
        self.hybrid_layer_pattern = str(self.pattern)
        positive(self, "hidden_size", "vocab_size", "layernorm_epsilon", "init_method_std")
        choice(self, "activation", ACTIVATIONS)
        choice(self, "position_embedding_type", POSITION_EMBEDDINGS)
        choice(self, "moe_router_score_function", ROUTER_SCORE_FUNCTIONS)
        self._check_dt_clamp()
        self._check_mtp()
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        positive(self, "ffn_hidden_size")  # MLPs, and the default width of MoE experts
        # Each mixer checks its own fields (megatron_hybrid/specs/); a symbol without a spec
        # fails when the model is built.
        counts = self.pattern.layer_counts()
        for symbol, spec in SPECS.items():
            if counts[symbol]:
                spec.check_config(self)

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
        return (
            2 * self.mamba_d_inner
            + 2 * self.mamba_num_groups * self.mamba_state_dim
            + (self.mamba_num_heads)
        )

    @property
    def mamba_dt_limit(self) -> tuple[float, float]:
        """(low, high) that Mamba2 clamps dt = softplus(dt + dt_bias) to; (0, inf): no clamp."""
        ceiling = math.inf if self.mamba_dt_ceiling is None else self.mamba_dt_ceiling
        return (self.mamba_dt_floor, ceiling)

    @property
    def moe_expert_input_size(self) -> int:
        """The width routed experts read and write: moe_latent_size (latent MoE), else
        hidden_size."""
        return self.hidden_size if self.moe_latent_size is None else self.moe_latent_size

    @property
    def tie_word_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    def to_dict(self) -> dict:
        """The constructor arguments, JSON-serializable (checkpoints record this)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    # -- validation ------------------------------------------------------------------------
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

    def _check_mtp(self) -> None:
        # Megatron-LM infers --mtp-num-layers from the pattern and, where the two disagree,
        # warns and uses the pattern; a disagreement is an error here. Recorded as the
        # pattern's count (None: no MTP), so checkpoints compare equal with or without the flag.
        depths, given = self.pattern.mtp_depths, self.mtp_num_layers
        factor = self.mtp_loss_scaling_factor
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 0):
            raise ConfigError(
                f"mtp_loss_scaling_factor (--mtp-loss-scaling-factor) must be a finite number "
                f">= 0, got {factor!r} (Megatron-LM's default: 0.1)"
            )
        if given is not None and (type(given) is not int or given < 0):
            raise ConfigError(
                f"mtp_num_layers (--mtp-num-layers) must be a whole number >= 0, got {given!r}"
            )
        if given is not None and given != depths:
            if depths:
                fix = f"give --mtp-num-layers {depths} or leave the flag out"
            else:
                example = self.hybrid_layer_pattern + "/M-" * given
                fix = (
                    f"append one '/'-part per depth to the pattern, e.g. {example!r}, or leave "
                    "--mtp-num-layers out"
                )
            raise ConfigError(
                f"mtp_num_layers (--mtp-num-layers) {given} disagrees with the "
                f"{depths} multi-token-prediction depth(s) ('/' parts) of pattern "
                f"{self.hybrid_layer_pattern!r}: the pattern sets the depths; {fix}"
            )
        self.mtp_num_layers = depths or None


def pad_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Round a tokenizer's vocabulary up as Megatron does (--make-vocab-size-divisible-by)."""
    if divisible_by <= 0:
        raise ConfigError(f"make_vocab_size_divisible_by must be positive, got {divisible_by}")
    return -(-vocab_size // divisible_by) * divisible_by
