"""Gradient clipping (megatron_hybrid/parallel/grad_norm.py) does what torch's
`clip_grad_norm_` does, over plain tensors, tensor-parallel DTensors and pipeline stages (a tied
embedding's copy counted once), and the trainer applies it as --clip-grad says.

Run as a script under torchrun (`worker` mode) it checks the two distributed cases on 2 ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_tensor_parallel import build_model, fixed_batch, torchrun
from test_training import TINY

from megatron_hybrid.parallel.grad_norm import clip_grad_norm
from megatron_hybrid.training import trainer
from megatron_hybrid.training.arguments import build_parser

# Norms of float32 gradients summed in another grouping or order: a few ulps apart.
NORM_RTOL = 1e-5


def parameters_with_gradients(seed: int) -> list[torch.nn.Parameter]:
    """Random parameters and gradients of several shapes, global gradient norm ~9."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(7, 5), (5,), (3, 4, 2), (11,)]:
        param = torch.nn.Parameter(torch.randn(shape, generator=gen))
        param.grad = torch.randn(shape, generator=gen)
        params.append(param)
    return params


def gradients(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0, float("inf")])
def test_clipping_matches_torch_on_plain_tensors(max_norm):
    ours, theirs = parameters_with_gradients(0), parameters_with_gradients(0)
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert float(norm) == pytest.approx(float(expected), rel=NORM_RTOL)
    for got, want in zip(gradients(ours), gradients(theirs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # one multiply each
    after = torch.nn.utils.get_total_norm(gradients(ours))
    assert float(after) <= min(max_norm, float(norm)) * (1 + NORM_RTOL)


def test_gradients_below_the_maximum_are_left_alone():
    params = parameters_with_gradients(1)
    before = gradients(params)
    norm = clip_grad_norm(params, max_norm=1e3)
    assert 1.0 < float(norm) < 1e3
    assert all(torch.equal(a, b) for a, b in zip(gradients(params), before, strict=True))


def test_a_tied_copy_is_clipped_but_counted_once():
    # The last pipeline stage's copy of a tied embedding has the first stage's gradient (after
    # TiedEmbeddingSync): the norm is that of the model's distinct parameters.
    params = parameters_with_gradients(2)
    copy = torch.nn.Parameter(params[0].detach().clone())
    copy.grad = params[0].grad.clone()
    reference = parameters_with_gradients(2)
    norm = clip_grad_norm(params, 0.5, copies=[copy])
    expected = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    assert float(norm) == pytest.approx(float(expected), rel=NORM_RTOL)
    torch.testing.assert_close(copy.grad, reference[0].grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(params[0].grad, reference[0].grad, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_tensor_parallel_and_pipeline_norms_match_one_process():
    torchrun(2, "worker", script=Path(__file__))


# -- in the trainer ------------------------------------------------------------------------------

CLIP_FLAGS = [*TINY, "--hybrid-layer-pattern", "M-*", "--train-iters", "4", "--log-interval", "1"]


def train(*flags: str, log_dir: Path | None = None):
    extra = ["--log-dir", str(log_dir)] if log_dir else []
    return trainer.run_training(build_parser().parse_args([*CLIP_FLAGS, *flags, *extra]))


def logged_grad_norms(log_dir: Path) -> list[float]:
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if "grad_norm" in r]


@pytest.mark.parametrize(
    "flags, max_norm", [([], 1.0), (["--clip-grad", "0.3"], 0.3)], ids=["default", "clip-0.3"]
)
def test_the_optimizer_steps_on_gradients_clipped_to_clip_grad(monkeypatch, flags, max_norm):
    # Measures the global norm of the gradients the optimizer is about to use: right after the
    # trainer's clipping call, which is followed directly by optimizer.step().
    norms = []  # (reported norm, norm after clipping) per iteration

    def clip_and_measure(parameters, *args, **kwargs):
        parameters = list(parameters)
        reported = clip_grad_norm(parameters, *args, **kwargs)
        after = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        norms.append((float(reported), float(after)))
        return reported

    monkeypatch.setattr(trainer, "clip_grad_norm", clip_and_measure)
    train(*flags)
    assert len(norms) == 4
    assert all(reported > max_norm for reported, _ in norms), norms  # so clipping had work
    for _, after in norms:
        assert after == pytest.approx(max_norm, rel=NORM_RTOL)


def test_clip_grad_0_turns_clipping_off(tmp_path):
    clipped = train(log_dir=tmp_path / "default")
    assert all(norm > 1.0 for norm in logged_grad_norms(tmp_path / "default"))
    unclipped = train("--clip-grad", "0")
    never_reached = train("--clip-grad", "1e9")
    # The first loss comes before any step. Adam's first step divides the gradient by its own
    # magnitude, so scaling all of it changes that step only through eps; from the second step
    # on, the moments mix gradients clipped by different factors and the runs part.
    assert unclipped.losses[0] == clipped.losses[0]
    assert all(
        abs(a - b) > 1e-3 for a, b in zip(unclipped.losses[2:], clipped.losses[2:], strict=True)
    )
    assert unclipped.losses == never_reached.losses  # 0 means no maximum at all


# -- the worker ----------------------------------------------------------------------------------

WORKER_FLAGS = [*TINY, "--hybrid-layer-pattern", "[M-]M[*-]M-", "--swiglu"]


def backward_on_fixed_batch(model, vocab_size: int) -> None:
    batch = fixed_batch(vocab_size)
    model(batch[:, :-1], batch[:, 1:]).backward()


def check_tensor_parallel_norm(world: int) -> None:
    """DTensor shards of Mamba2, attention and (packed SwiGLU) MLP weights beside replicated
    tensors: the norm is the unsharded model's, and every local shard is scaled by torch's
    factor for that norm."""
    from megatron_hybrid.parallel.dims import ParallelDims
    from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel

    whole, config = build_model(WORKER_FLAGS)
    sharded, _ = build_model(WORKER_FLAGS)
    mesh = ParallelDims(world, tp=world).build_mesh("cpu")
    apply_tensor_parallel(sharded, mesh["tp"], log=lambda _: None)
    for model in (whole, sharded):
        backward_on_fixed_batch(model, config.vocab_size)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in whole.parameters()]))
    local = [
        p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in sharded.parameters()
    ]
    assert any(hasattr(p.grad, "to_local") for p in sharded.parameters())
    before = [g.clone() for g in local]
    max_norm = expected / 4
    norm = float(clip_grad_norm(sharded.parameters(), max_norm))
    assert norm == pytest.approx(expected, rel=NORM_RTOL), (norm, expected)
    coef = max_norm / (norm + 1e-6)  # torch's clip_grad_norm_ factor
    for now, was in zip(local, before, strict=True):
        torch.testing.assert_close(now, was * coef, rtol=1e-6, atol=0)


def check_pipeline_norm_with_tied_copy(rank: int, world: int) -> None:
    """Each rank holds some of a model's parameters (a pipeline's stages), the last rank also a
    copy of the first parameter (a tied embedding) with its gradient: the norm summed over the
    pipeline group is the whole model's, the copy not counted, and the copy clipped alike."""
    import torch.distributed as dist

    params = parameters_with_gradients(3)
    reference = parameters_with_gradients(3)
    expected = float(torch.nn.utils.clip_grad_norm_(reference, 1.0))
    mine = params[rank::world]
    copies = []
    if rank == world - 1:
        copies = [torch.nn.Parameter(params[0].detach().clone())]
        copies[0].grad = params[0].grad.clone()
    norm = float(clip_grad_norm(mine, 1.0, pipeline_group=dist.group.WORLD, copies=copies))
    assert norm == pytest.approx(expected, rel=NORM_RTOL), (norm, expected)
    for param, want in zip(
        mine + copies, reference[rank::world] + reference[: len(copies)], strict=True
    ):
        torch.testing.assert_close(param.grad, want.grad, rtol=1e-6, atol=0)


def worker() -> None:
    import torch.distributed as dist

    from megatron_hybrid.parallel.distributed import end_successful_run

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    check_tensor_parallel_norm(world)
    check_pipeline_norm_with_tied_copy(rank, world)
    end_successful_run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker()
