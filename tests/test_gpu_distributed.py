"""Two CUDA GPUs (marker `gpu`, skipped with fewer): FSDP2 data parallel over NCCL in bf16
tracks the one-GPU bf16 run."""

from __future__ import annotations

import pytest
import torch
from test_distributed import FLAGS, torchrun

from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.trainer import run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


def test_bf16_data_parallel_on_two_gpus_tracks_one_gpu(tmp_path):
    flags = [*FLAGS, "--device", "cuda", "--bf16"]
    dp2 = torchrun(2, *flags, log_dir=tmp_path)
    single = run_training(build_parser().parse_args(flags)).losses
    # One GPU: fp32 parameters, bf16 autocast GEMMs. FSDP2: bf16 parameter copies, fp32
    # reduction. Both round GEMM inputs to bf16 (8 bits of mantissa, ~4e-3 relative), the
    # difference compounds over 6 optimizer steps: 2e-2 relative on losses of ~5 nats.
    for a, b in zip(dp2, single, strict=True):
        assert a == pytest.approx(b, rel=2e-2)
