"""Layouts and options no other test runs: the gpipe and looped-bfs pipeline schedules, --compile
under data, tensor and pipeline parallelism, and FSDP2's bf16 parameters with float32 gradient
reduction (torchrun, gloo, CPU).

Run as a script under torchrun (`worker` mode) it checks FSDP2's mixed-precision setup."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import FLAGS, assert_close, one_process, torchrun
from test_parallel_layouts import FOUR_SEGMENTS, PP2, TP2, TWO_SEGMENTS
from test_tensor_parallel import torchrun as torchrun_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    """Losses of the one-process run (identical for both cuts: one process ignores '|')."""
    return one_process(*FOUR_SEGMENTS)


# Same tolerance and reasoning as tests/test_parallel_layouts.py: the same float32 math reduced
# in another order (pipeline micro-batch gradients summed, then divided).
@pytest.mark.parametrize(
    "pattern, schedule",
    [
        (TWO_SEGMENTS, "gpipe"),  # one stage per rank
        (FOUR_SEGMENTS, "looped-bfs"),  # two virtual stages per rank
    ],
    ids=["gpipe", "looped-bfs"],
)
def test_pipeline_schedule_matches_one_process(tmp_path, reference, pattern, schedule):
    losses = torchrun(2, *FLAGS, *pattern, *PP2, "--pipeline-schedule", schedule, log_dir=tmp_path)
    assert_close(losses, reference)


# A small model and few steps: every rank compiles every block it holds on the CPU.
COMPILE_FLAGS = ["--hybrid-layer-pattern", "[M-]*|[M-]*", "--train-iters", "3"]


@pytest.fixture(scope="module")
def eager_reference():
    return one_process(*COMPILE_FLAGS)


# Tolerance as for every layout (tests/test_parallel_layouts.py, rtol 1e-5): Inductor's fused
# float32 kernels reorder sums like another layout does, a few ulps per step (measured: at most
# 1e-7 over these 3 steps); a compiled block computing something else would be off by far more.
@pytest.mark.parametrize(
    "layout, blocks_per_rank", [([], 4), (TP2, 4), (PP2, 2)], ids=["dp2", "tp2", "pp2"]
)
def test_compile_under_a_layout_trains_like_eager_one_process(
    tmp_path, eager_reference, layout, blocks_per_rank
):
    proc = torchrun_script(
        2, *FLAGS, *COMPILE_FLAGS, *layout, "--compile", "--log-dir", str(tmp_path)
    )
    assert f"torch.compile: {blocks_per_rank} blocks compiled" in proc.stdout
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert_close([r["loss"] for r in records if "loss" in r], eager_reference)


def test_fsdp_bf16_computes_in_bf16_and_reduces_in_float32():
    torchrun_script(2, "worker", script=Path(__file__))


# -- the worker ----------------------------------------------------------------------------------


def check_fsdp_mixed_precision() -> None:
    """apply_fsdp(bf16=True) sets every FSDP unit (each block and the root) to gather its
    parameters in bf16 and reduce gradients in float32, and a step does so: the linear layers
    compute in bf16, the reduce-scatter runs on float32, and the sharded parameters and their
    gradients (what the optimizer sees) stay float32."""
    import torch.distributed as dist
    from test_tensor_parallel import build_model, fixed_batch

    from megatron_hybrid.parallel.dims import ParallelDims
    from megatron_hybrid.parallel.fsdp import apply_fsdp

    model, config = build_model([*FLAGS, *COMPILE_FLAGS])
    apply_fsdp(
        model, ParallelDims(dist.get_world_size()).build_mesh("cpu"), bf16=True, log=lambda _: None
    )
    for unit in [*model.decoder.layers.values(), model]:
        policy = unit._get_fsdp_state()._mp_policy  # FSDP2 keeps no public getter
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32), (
            type(unit).__name__,
            policy,
        )

    compute_dtypes = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(
                lambda m, args: compute_dtypes.add((m.weight.dtype, args[0].dtype))
            )
    reduced_dtypes = set()
    reduce_scatter = dist.reduce_scatter_single  # what FSDP2's default reduce-scatter calls

    def recording_reduce_scatter(*args, **kwargs):
        reduced_dtypes.add(kwargs["input"].dtype)
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = recording_reduce_scatter
    batch = fixed_batch(config.vocab_size)
    model(batch[:, :-1], batch[:, 1:]).backward()
    dist.reduce_scatter_single = reduce_scatter
    assert compute_dtypes == {(torch.bfloat16, torch.bfloat16)}, compute_dtypes
    assert reduced_dtypes == {torch.float32}, reduced_dtypes
    assert {(p.dtype, p.grad.dtype) for p in model.parameters()} == {(torch.float32, torch.float32)}


def worker() -> None:
    import torch.distributed as dist

    from megatron_hybrid.parallel.distributed import end_successful_run

    dist.init_process_group("gloo")
    check_fsdp_mixed_precision()
    end_successful_run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker()
