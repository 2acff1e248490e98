"""CUDA checks (marker `gpu`, skipped without a GPU): CPU == GPU logits, bf16 training."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.trainer import run_training

pytestmark = pytest.mark.gpu


def test_cuda_logits_match_cpu_in_float32():
    # TF32 off: the comparison is about our math, not reduced-precision matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = small_config("[M-][*E]M-", hidden_size=64, mamba_head_dim=16)
    model = HybridModel(config, seed=3)
    tokens = torch.randint(0, config.vocab_size, (2, 37))
    cpu = model(tokens)
    gpu = model.cuda()(tokens.cuda()).cpu()
    # Different summation orders in float32 over a few layers: 1e-4 absolute on O(1) logits.
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_default_run_in_bf16_on_cuda_reaches_the_default_target():
    # The README's default run (250 iterations, ~10 s on an H100) with bf16 autocast: the same
    # 2.2 nats/byte validation target as the float32 CPU run.
    args = build_parser().parse_args(
        ["--device", "cuda", "--bf16", "--generate-tokens", "8", "--no-progress-bar"]
    )
    result = run_training(args)
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10 - 1.0
    assert result.val_losses[250] < 2.2


def test_auto_kernels_track_the_eager_run_over_50_steps():
    # Every op Triton (norms, conv1d, SSD, activations, rotary, grouped-GEMM experts, fused
    # linear cross-entropy) against the eager reference ops, bf16 autocast, same data and seed.
    # Both round GEMM inputs and kernel outputs to bf16 (~4e-3 relative) in different places,
    # so the trajectories drift apart like two runs with different reduction orders: each
    # iteration within 3e-2 relative, the mean of the last 10 within 1e-2.
    flags = [
        "--device",
        "cuda",
        "--bf16",
        "--hybrid-layer-pattern",
        "[M-][*E]M*-[ME]-",
        "--hidden-size",
        "256",
        "--ffn-hidden-size",
        "512",
        "--num-attention-heads",
        "8",
        "--num-query-groups",
        "4",
        "--mamba-num-heads",
        "8",
        "--mamba-head-dim",
        "64",
        "--mamba-num-groups",
        "2",
        "--mamba-state-dim",
        "64",
        "--num-experts",
        "8",
        "--moe-router-topk",
        "2",
        "--moe-ffn-hidden-size",
        "256",
        "--seq-length",
        "512",
        "--micro-batch-size",
        "8",
        "--train-iters",
        "50",
        "--eval-iters",
        "0",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--lr-warmup-iters",
        "5",
        "--generate-tokens",
        "0",
        "--no-progress-bar",
    ]
    auto = run_training(build_parser().parse_args([*flags, "--kernels", "auto"]))
    eager = run_training(build_parser().parse_args([*flags, "--kernels", "eager"]))
    assert auto.model.kernels.impl("ssd") == "triton"
    assert auto.model.kernels.impl("linear_cross_entropy") == "triton"
    assert len(auto.losses) == len(eager.losses) == 50
    for a, b in zip(auto.losses, eager.losses, strict=True):
        assert a == pytest.approx(b, rel=3e-2)
    assert sum(auto.losses[-10:]) == pytest.approx(sum(eager.losses[-10:]), rel=1e-2)
    assert auto.losses[-1] < auto.losses[0] - 1.0
