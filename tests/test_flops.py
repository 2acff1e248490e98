"""Model FLOPs per token and analytic parameter counts (megatron_hybrid/flops.py), and a smoke run
of benchmarks/train_throughput.py on CPU.

Hand arithmetic uses conftest.small_config: H=32, V=64, F=48, attention a=4 heads, g=2 groups,
d=32/4=8; Mamba2 h=2*32/8=8 heads, P=8, G=2, N=8, K=4, Q=8; MoE E=4, k=2, Fe=24; squared ReLU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_config

from megatron_hybrid.flops import (
    forward_flops_per_token,
    layer_forward_flops_per_token,
    parameter_count,
    training_flops_per_token,
)
from megatron_hybrid.model import HybridModel

REPO = Path(__file__).resolve().parent.parent
LOGITS = 2 * 32 * 64  # 4096


def test_mamba_layer_by_hand():
    config = small_config("M")
    d_inner = 8 * 8  # 64
    conv_dim = d_inner + 2 * 2 * 8  # 96
    in_dim = 2 * d_inner + 2 * 2 * 8 + 8  # 168
    in_proj = 2 * 32 * in_dim  # 10752
    conv = 2 * 4 * conv_dim  # 768
    scores = 2 * 8 * 8 * 2  # 2*Q*N*G = 256
    scores_x = 2 * 8 * 8 * 8  # 2*Q*P*h = 1024
    states = 2 * 8 * 8 * 8  # 2*P*N*h = 1024
    readout = 2 * 8 * 8 * 8  # 2*P*N*h = 1024
    carry = 2 * 8 * 8 * 8 / 8  # 2*P*N*h/Q = 128
    out_proj = 2 * d_inner * 32  # 4096
    expected = in_proj + conv + scores + scores_x + states + readout + carry + out_proj
    assert expected == 19072
    assert layer_forward_flops_per_token(config, "M", 16) == expected
    assert forward_flops_per_token(config, 16) == 19072 + LOGITS
    assert training_flops_per_token(config, 16) == 3 * (19072 + LOGITS)


def test_attention_layer_by_hand():
    config = small_config("*")
    T = 16
    qkv = 2 * 32 * (4 + 2 * 2) * 8  # 4096
    scores_and_pv = 2 * 2 * T * 8 * 4  # full T (Megatron's convention): 2048
    proj = 2 * 4 * 8 * 32  # 2048
    assert layer_forward_flops_per_token(config, "*", T) == qkv + scores_and_pv + proj == 8192
    assert training_flops_per_token(config, T) == 3 * (8192 + LOGITS)


def test_mlp_by_hand():
    assert layer_forward_flops_per_token(small_config("-"), "-", 16) == 2 * 32 * 48 + 2 * 48 * 32
    swiglu = small_config("-", activation="swiglu")
    # fc1 packs gate and up: 2*H*(2F) + 2*F*H = 6144 + 3072
    assert layer_forward_flops_per_token(swiglu, "-", 16) == 2 * 32 * 96 + 2 * 48 * 32 == 9216


def test_moe_counts_only_topk_experts_plus_router_and_shared():
    config = small_config("E")
    router = 2 * 32 * 4  # 256
    expert = 2 * 32 * 24 + 2 * 24 * 32  # 3072
    assert layer_forward_flops_per_token(config, "E", 16) == router + 2 * expert == 6400
    # More experts: only the router grows; the top-k work stays.
    more = small_config("E", num_moe_experts=16)
    assert layer_forward_flops_per_token(more, "E", 16) == 2 * 32 * 16 + 2 * expert
    shared = small_config("E", moe_shared_expert_intermediate_size=16)
    assert layer_forward_flops_per_token(shared, "E", 16) == 6400 + 2 * 32 * 16 + 2 * 16 * 32
    top1 = small_config("E", moe_router_topk=1)
    assert layer_forward_flops_per_token(top1, "E", 16) == router + expert


def test_whole_model_is_sum_of_layers_plus_logits():
    config = small_config("M-M*-E")
    T = 16
    expected = 2 * 19072 + 2 * 6144 + 8192 + 6400 + LOGITS
    assert forward_flops_per_token(config, T) == expected
    assert training_flops_per_token(config, T) == 3 * expected


@pytest.mark.parametrize(
    "unfused, fused",
    [
        ("M-M-M*-", "[M-][M-]M[*-]"),
        ("M*-ME", "M[*-][ME]"),
        ("M-*-|ME", "[M-][*-]|[ME]"),
    ],
)
def test_fused_equals_unfused(unfused, fused):
    for T in (16, 64):
        assert training_flops_per_token(small_config(fused), T) == training_flops_per_token(
            small_config(unfused), T
        )
    assert parameter_count(small_config(fused)) == parameter_count(small_config(unfused))


def test_doubling_seq_length_doubles_only_attention_scores():
    T = 32
    # Mamba, MLP and MoE per-token FLOPs do not depend on T.
    for pattern in ("M", "-", "E", "M-E"):
        config = small_config(pattern)
        assert training_flops_per_token(config, 2 * T) == training_flops_per_token(config, T)
    config = small_config("M*-*")
    delta = training_flops_per_token(config, 2 * T) - training_flops_per_token(config, T)
    # 3 (fwd+bwd) * 2 attention layers * (2*2*T*d*a at 2T minus at T) = 3 * 2 * 4*T*8*4
    assert delta == 3 * 2 * (2 * 2 * T * 8 * 4)


def test_chunk_size_moves_only_ssd_terms():
    a, b = small_config("M", mamba_chunk_size=8), small_config("M", mamba_chunk_size=16)
    h, P, G, N = 8, 8, 2, 8
    ssd = {Q: 2 * Q * N * G + 2 * Q * P * h + 4 * P * N * h + 2 * P * N * h / Q for Q in (8, 16)}
    diff = layer_forward_flops_per_token(b, "M", 16) - layer_forward_flops_per_token(a, "M", 16)
    assert diff == ssd[16] - ssd[8]


@pytest.mark.parametrize(
    "pattern, overrides",
    [
        ("M", {}),
        ("*", {}),
        ("M-M*-", {}),
        ("[M-][*-]M", {"untie_embeddings_and_output_weights": True}),
        ("M[*E]-", {"moe_shared_expert_intermediate_size": 16}),
        (
            "[ME]*E",
            {
                "activation": "swiglu",
                "moe_shared_expert_intermediate_size": 40,
                "untie_embeddings_and_output_weights": True,
                "moe_router_enable_expert_bias": True,
            },
        ),
        (
            "M*-",
            {
                "kv_channels": 12,
                "num_query_groups": 1,
                "mamba_num_heads": 4,
                "mamba_conv_kernel": 3,
            },
        ),
    ],
)
def test_parameter_count_matches_built_model(pattern, overrides):
    config = small_config(pattern, **overrides)
    assert parameter_count(config) == HybridModel(config).num_parameters()


def test_parameter_count_by_hand():
    config = small_config("-")
    # embedding 64*32 + final norm 32 + pre_mlp_layernorm 32 + fc1 32*48 + fc2 48*32
    assert parameter_count(config) == 64 * 32 + 32 + 32 + 32 * 48 + 48 * 32


def test_benchmark_named_configs():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import train_throughput as tt
    finally:
        sys.path.pop(0)
    assert tt.fuse_pattern("M-M*-M") == "[M-]M[*-]M"
    for name, bench in tt.CONFIGS.items():
        if name.endswith("-fused"):
            base = tt.CONFIGS[name.removesuffix("-fused")]
            fused, plain = bench.model_config(), base.model_config()
            assert fused.pattern.num_blocks < plain.pattern.num_blocks
            assert fused.pattern.layer_counts() == plain.pattern.layer_counts()
            assert training_flops_per_token(fused, bench.seq_length) == training_flops_per_token(
                plain, base.seq_length
            )
            assert parameter_count(fused) == parameter_count(plain)
    ci = tt.CONFIGS["megatron-ci-hybrid"].model_config()
    assert ci.pattern.layer_counts()["*"] == 4 and ci.pattern.num_layers == 44
    assert 0.9e9 < parameter_count(tt.CONFIGS["hybrid-1b"].model_config()) < 1.1e9


def test_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "tt.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_throughput.py"),
            "--config",
            "cpu-smoke",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["peak_tflops"] is None
    (result,) = data["results"]
    assert result["config"] == "cpu-smoke"
    assert result["parameters"] > 0 and result["flops_per_token"] > 0
    assert len(result["step_times_s"]) == 2 and result["median_step_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(
        result["tokens_per_step"] / result["median_step_s"]
    )
    assert result["mfu"] is None and result["peak_memory_bytes"] is None
    assert "n/a" in proc.stdout
