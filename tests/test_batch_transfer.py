"""A training batch reaches the GPU without a host synchronization (training/trainer.py
`to_device`), and stays as it is on CPU."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.training.trainer import to_device


def test_a_cpu_batch_stays_the_same_tensor_on_cpu():
    batch = torch.randint(0, 100, (2, 9))
    assert to_device(batch, torch.device("cpu")) is batch


@pytest.mark.gpu
def test_a_batch_reaches_the_gpu_without_waiting_for_the_queue():
    batch = torch.randint(0, 100, (4, 1025))
    device = torch.device("cuda")
    torch.cuda.set_sync_debug_mode("error")  # a blocking copy from pageable memory raises
    try:
        moved = to_device(batch, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), batch)
