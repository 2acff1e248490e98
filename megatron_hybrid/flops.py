"""Model FLOPs per token and parameter counts of a hybrid model, from its config alone.

`training_flops_per_token(config, seq_length)` is the MFU numerator: model FLOPs (not hardware
FLOPs: activation recomputation is not counted) of one forward and backward pass, divided by
the tokens of the batch. Backward costs two forwards (one GEMM for the input gradient, one for the
weight gradient), so training = 3 x forward. Only matrix products are counted (2 FLOPs per
multiply-add), plus Mamba2's depthwise conv; norms, activations, softmax, rotary, gating, the
SSD decays / dt / D skip and the embedding lookup are elementwise or lookups and count 0.

Every sum runs over the canonical sub-layers (`pattern.layer_counts()`), so a fused pattern such
as `[M-][*-]` has exactly the FLOPs of `M-*-`. Symbols below, per token, forward:

    H hidden_size, V vocab_size, T seq_length

    M  Mamba2     h = mamba_num_heads, P = mamba_head_dim, G = mamba_num_groups,
                  N = mamba_state_dim, K = mamba_conv_kernel, Q = mamba_chunk_size,
                  d_inner = h*P, conv_dim = d_inner + 2*G*N,
                  in_dim = 2*d_inner + 2*G*N + h   (z, x, B, C, dt)
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
    *  attention  a = num_attention_heads, g = num_query_groups, d = kv_channels
        linear_qkv                 2 * H * (a + 2*g) * d
        Q K^T and scores @ V       2 * 2 * T * d * a
            (Megatron's convention: the full T x T score matrix, no halving for the causal mask;
            a causal-aware count would be half of this term)
        linear_proj                2 * a * d * H
    -  MLP        F = ffn_hidden_size, F1 = 2*F for SwiGLU (gate and up packed) else F
        linear_fc1 + linear_fc2    2 * H * F1 + 2 * F * H
    E  MoE        E = num_moe_experts, k = moe_router_topk, Fe = moe_ffn_hidden_size,
                  Fs = moe_shared_expert_intermediate_size
        router                     2 * H * E
        k routed experts           k * (2 * H * Fe1 + 2 * Fe * H)   (only the chosen experts)
        shared expert (if any)     2 * H * Fs1 + 2 * Fs * H
    output layer (logits)          2 * H * V        (tied or not)
    embedding lookup               0

MTP depths ('/') and the symbols without an implementation (G, D, +) raise ValueError.

`parameter_count(config)` is the analytic number of trainable parameters, equal to
`HybridModel(config).num_parameters()` (router expert-bias and token counts are buffers).
"""

from __future__ import annotations

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.pattern import channel_symbol, sequence_symbol

__all__ = [
    "forward_flops_per_token",
    "layer_forward_flops_per_token",
    "parameter_count",
    "training_flops_per_token",
]

_COUNTED = frozenset("M*-E")


def _check(config: ModelConfig) -> dict[str, int]:
    pattern = config.pattern
    if pattern.mtp_depths:
        raise ValueError(
            f"pattern {config.hybrid_layer_pattern!r} has MTP depths; FLOPs and parameters of "
            "multi-token prediction are not defined yet"
        )
    counts = pattern.layer_counts()
    unknown = [s for s, n in counts.items() if n and s not in _COUNTED]
    if unknown:
        raise ValueError(
            f"no FLOP / parameter formula for symbol(s) {' '.join(unknown)} of pattern "
            f"{config.hybrid_layer_pattern!r}; counted symbols: M * - E"
        )
    return counts


def _fc1(ffn: int, activation: str) -> int:
    return 2 * ffn if activation == "swiglu" else ffn


def _mlp_flops(hidden: int, ffn: int, activation: str) -> int:
    return 2 * hidden * _fc1(ffn, activation) + 2 * ffn * hidden


def layer_forward_flops_per_token(config: ModelConfig, symbol: str, seq_length: int) -> float:
    """Forward FLOPs per token of one canonical sub-layer `symbol` (M, *, -, E)."""
    H = config.hidden_size
    if symbol == "M":
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
    if symbol == "*":
        a, g, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
        qkv = 2 * H * (a + 2 * g) * d
        scores = 2 * 2 * seq_length * d * a  # full T, Megatron's convention
        proj = 2 * a * d * H
        return qkv + scores + proj
    if symbol == "-":
        return _mlp_flops(H, config.ffn_hidden_size, config.activation)
    if symbol == "E":
        flops = 2 * H * config.num_moe_experts
        flops += config.moe_router_topk * _mlp_flops(H, config.moe_ffn_hidden_size,
                                                     config.activation)
        if config.moe_shared_expert_intermediate_size is not None:
            flops += _mlp_flops(H, config.moe_shared_expert_intermediate_size, config.activation)
        return flops
    raise ValueError(f"no FLOP formula for symbol {symbol!r}")


def forward_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token: every canonical sub-layer plus the logits."""
    counts = _check(config)
    total = 2 * config.hidden_size * config.vocab_size
    for symbol, n in counts.items():
        if n:
            total += n * layer_forward_flops_per_token(config, symbol, seq_length)
    return float(total)


def training_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Model FLOPs of forward + backward per token (3 x forward); see the module docstring."""
    return 3.0 * forward_flops_per_token(config, seq_length)


def _mlp_params(hidden: int, ffn: int, activation: str) -> int:
    return hidden * _fc1(ffn, activation) + ffn * hidden


def _layer_params(config: ModelConfig, symbol: str) -> int:
    H = config.hidden_size
    if symbol == "M":
        h, d_inner, conv_dim = config.mamba_num_heads, config.mamba_d_inner, config.mamba_conv_dim
        return (
            H * config.mamba_in_proj_dim  # in_proj
            + conv_dim * config.mamba_conv_kernel + conv_dim  # conv1d weight + bias
            + 3 * h  # dt_bias, A_log, D
            + d_inner  # gated RMSNorm weight
            + d_inner * H  # out_proj
        )
    if symbol == "*":
        a, g, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
        return H * (a + 2 * g) * d + a * d * H
    if symbol == "-":
        return _mlp_params(H, config.ffn_hidden_size, config.activation)
    if symbol == "E":
        E = config.num_moe_experts
        params = E * H + E * _mlp_params(H, config.moe_ffn_hidden_size, config.activation)
        if config.moe_shared_expert_intermediate_size is not None:
            params += _mlp_params(H, config.moe_shared_expert_intermediate_size,
                                  config.activation)
        return params
    raise ValueError(f"no parameter formula for symbol {symbol!r}")


def parameter_count(config: ModelConfig) -> int:
    """Trainable parameters of `HybridModel(config)`, analytically.

    Embedding V*H, output layer V*H when untied, final norm H, and per canonical sub-layer its
    pre-norm (H: input_layernorm for a sequence mixer, pre_mlp_layernorm for a channel mixer)
    plus its weights. Fusion does not change the count: a fused block holds both norms."""
    counts = _check(config)
    H, V = config.hidden_size, config.vocab_size
    total = V * H + H  # embedding, final norm
    if config.untie_embeddings_and_output_weights:
        total += V * H
    for block in config.pattern.blocks:
        for symbol in (sequence_symbol(block), channel_symbol(block)):
            if symbol is not None:
                total += H + _layer_params(config, symbol)
    assert sum(counts.values()) == config.pattern.num_layers
    return total
