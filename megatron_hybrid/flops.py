"""Model FLOPs per token and parameter counts of a hybrid model, from its config alone.

`training_flops_per_token(config, seq_length)` is the MFU numerator: model FLOPs (not hardware
FLOPs: activation recomputation is not counted) of one forward and backward pass, divided by
the tokens of the batch. Backward costs two forwards (one GEMM for the input gradient, one for the
weight gradient), so training = 3 x forward. Only matrix products are counted (2 FLOPs per
multiply-add), plus Mamba2's depthwise conv; norms, activations, softmax, rotary, gating, the
SSD decays / dt / D skip and the embedding lookup are elementwise or lookups and count 0.

Every sum runs over the canonical sub-layers (`pattern.layer_counts()`), so a fused pattern such
as `[M-][*-]` has exactly the FLOPs of `M-*-`. Per token, forward, with H = hidden_size,
V = vocab_size, T = seq_length:

    each sub-layer                 its spec's `forward_flops_per_token`, whose docstring gives
                                   the formula: M megatron_hybrid/specs/mamba2.py, * specs/
                                   attention.py, + specs/mla.py, - specs/mlp.py, E specs/
                                   moe.py
    output layer (logits)          2 * H * V        (tied or not)
    embedding lookup               0
    each MTP depth ('/' part)      2 * 2H * H (eh_proj) + 2 * H * V (its logits), plus its
                                   sub-layers, counted with the others (`layer_counts()` counts
                                   every depth's); as Megatron-LM counts MTP

The symbols without a spec raise ValueError.

`parameter_count(config)` is the analytic number of trainable parameters, equal to
`HybridModel(config).num_parameters()` (router expert-bias and token counts are buffers).
"""

from __future__ import annotations

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.pattern import channel_symbol, sequence_symbol
from megatron_hybrid.specs import SPECS, MixerSpec

__all__ = [
    "forward_flops_per_token",
    "layer_forward_flops_per_token",
    "parameter_count",
    "training_flops_per_token",
]


def _check(config: ModelConfig) -> dict[str, int]:
    counts = config.pattern.layer_counts()
    unknown = [s for s, n in counts.items() if n and s not in SPECS]
    if unknown:
        raise ValueError(
            f"no FLOP / parameter formula for symbol(s) {' '.join(unknown)} of pattern "
            f"{config.hybrid_layer_pattern!r}; counted symbols: {' '.join(SPECS)}"
        )
    return counts


def _spec(symbol: str) -> MixerSpec:
    spec = SPECS.get(symbol)
    if spec is None:
        raise ValueError(f"no FLOP / parameter formula for symbol {symbol!r}")
    return spec


def layer_forward_flops_per_token(config: ModelConfig, symbol: str, seq_length: int) -> float:
    """Forward FLOPs per token of one canonical sub-layer `symbol` (M, *, +, -, E)."""
    return _spec(symbol).forward_flops_per_token(config, seq_length)


def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token: every canonical sub-layer (MTP depths' included), the logits,
    and each MTP depth's eh_proj and logits."""
    counts = _check(config)
    H, V = config.hidden_size, config.vocab_size
    total = 2 * H * V + config.pattern.mtp_depths * (2 * 2 * H * H + 2 * H * V)
    for symbol, n in counts.items():
        if n:
            total += n * layer_forward_flops_per_token(config, symbol, seq_length)
    return float(total)


def training_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Model FLOPs of forward + backward per token (3 x forward); see the module docstring."""
    return 3.0 * forward_flops_per_token(config, seq_length)


def parameter_count(config: ModelConfig) -> int:
    """Trainable parameters of `HybridModel(config)`, analytically.

    Embedding V*H, output layer V*H when untied, final norm H, and per canonical sub-layer its
    pre-norm (H) plus its mixer's parameters (its spec's `parameter_count`); per MTP depth its
    enorm, hnorm and final_layernorm (3H), eh_proj (2H * H) and its part's sub-layers (the
    embedding and output layer are shared). Fusion does not change the count: a fused block
    holds both norms."""
    counts = _check(config)
    pattern = config.pattern
    H, V = config.hidden_size, config.vocab_size
    total = V * H + H  # embedding, final norm
    if config.untie_embeddings_and_output_weights:
        total += V * H
    total += _blocks_parameter_count(config, pattern.blocks)
    depth = 3 * H + 2 * H * H + _blocks_parameter_count(config, pattern.mtp_blocks)
    total += pattern.mtp_depths * depth
    assert sum(counts.values()) == pattern.num_layers + pattern.mtp_depths * pattern.mtp_num_layers
    return total


def _blocks_parameter_count(config: ModelConfig, blocks: tuple[str, ...]) -> int:
    """Parameters of physical `blocks`: per sub-layer its pre-norm and its mixer."""
    total = 0
    for block in blocks:
        for symbol in (sequence_symbol(block), channel_symbol(block)):
            if symbol is not None:
                total += config.hidden_size + _spec(symbol).parameter_count(config)
    return total


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by CUDA device name, most specific first:
# the denominator of the MFU in the training log line.
BF16_DENSE_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The accelerator's dense bf16 peak, or None for a device not in the table."""
    for key, tflops in BF16_DENSE_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None
