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
    args = build_parser().parse_args(["--device", "cuda", "--bf16", "--generate-tokens", "8",
                                      "--no-progress-bar"])
    result = run_training(args)
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10 - 1.0
    assert result.val_losses[250] < 2.2
