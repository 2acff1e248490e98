"""The last pipeline stage computes its loss through the model's own loss path (the bound
`linear_cross_entropy` kernel, as one process does), in training and in evaluation.

Run as a script under torchrun (2 ranks, gloo, CPU) it builds the trainer's pipeline of two
stages, wraps the last stage's bound kernel to count its calls, and compares the pipeline's loss
with the whole model's `model(inputs, labels)` on the same micro-batches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import small_config
from test_tensor_parallel import torchrun

pytestmark = pytest.mark.slow

MICRO_BATCHES = 2


def test_last_stage_loss_goes_through_the_bound_linear_cross_entropy():
    proc = torchrun(2, "worker", script=Path(__file__))
    assert proc.stdout.count("loss path matches one process") == 2, proc.stdout[-3000:]


def worker() -> None:
    from megatron_hybrid.model import HybridModel
    from megatron_hybrid.parallel.distributed import end_successful_run, init_distributed
    from megatron_hybrid.parallel.parallelize import ParallelSettings
    from megatron_hybrid.training.settings import TrainingSettings
    from megatron_hybrid.training.trainer import Trainer

    proc = init_distributed("cpu")
    config = small_config("M*|-E")
    parallel = ParallelSettings(pipeline_model_parallel_size=2)
    dims = parallel.dims(proc.world_size)
    trainer = Trainer(
        config,
        TrainingSettings(micro_batch_size=2),
        parallel,
        dims,
        dims.build_mesh("cpu"),
        proc.device,
        None,
        MICRO_BATCHES,
        log=lambda _: None,
    )
    pipeline = trainer.pipeline
    calls = []
    for part in trainer.parts:
        bound = part.kernels.linear_cross_entropy

        def counted(*args, bound=bound, **kwargs):
            calls.append(args[0].shape)
            return bound(*args, **kwargs)

        part.kernels.linear_cross_entropy = counted
    batch = torch.randint(
        0, config.vocab_size, (MICRO_BATCHES * 2, 9), generator=torch.Generator().manual_seed(3)
    )
    reference = HybridModel(config, seed=TrainingSettings().seed)
    with torch.no_grad():
        expected = torch.stack(
            [reference(micro[:, :-1], micro[:, 1:]) for micro in batch.chunk(MICRO_BATCHES)]
        ).mean()

    trained = pipeline.train_step(batch[:, :-1], batch[:, 1:])
    train_calls = len(calls)
    evaluated = pipeline.eval_step(batch[:, :-1], batch[:, 1:])
    if pipeline.has_last:
        # One call per micro-batch, in training and in evaluation, plus one each for torch's
        # shape-inference forward (run on the first step and again on switching to evaluation).
        assert train_calls == MICRO_BATCHES + 1, calls
        assert len(calls) - train_calls == MICRO_BATCHES + 1, calls
        # The same float32 ops on the same micro-batches as the whole model: equal bits.
        assert torch.equal(trained, expected), (trained, expected)
        assert torch.equal(evaluated, expected), (evaluated, expected)
    else:
        assert calls == [] and trained is None and evaluated is None
    print(f"rank {proc.rank}: loss path matches one process", flush=True)
    end_successful_run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker()
