"""Gated DeltaNet under tensor parallelism (torchrun, gloo, CPU, float32): split over key and
value heads, it computes one process's gradients and trains like one process, and its
checkpoints stay canonical, moving between tp2 and one process (tests/test_tensor_parallel.py
has the launcher and the checkpoint worker).

Run as a script under torchrun (`gradients` mode) it writes the canonical gradients of a
tensor-parallel model (see `gradient_worker`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_parameters
from test_tensor_parallel import (
    FLAGS,
    SP,
    TP2,
    assert_close,
    assert_loads_exactly,
    build_model,
    fixed_batch,
    one_process_logits,
    torchrun,
    train_one_process,
    train_torchrun,
)

# G fused and stand-alone, beside Mamba, attention and MLPs; two micro-batches per step.
GDN = [*FLAGS, "--hybrid-layer-pattern", "[G-]M[*-]G-"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The run in one process, saving at iterations 3 and 6."""
    save = tmp_path_factory.mktemp("gdn_single")
    return train_one_process(*GDN, "--save", str(save), "--save-interval", "3"), save


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """The same run with tensor parallelism 2, saving at iterations 3 and 6."""
    root = tmp_path_factory.mktemp("gdn_tp2")
    save = ["--save", str(root / "ckpt"), "--save-interval", "3"]
    return train_torchrun(2, *GDN, *TP2, *save, log_dir=root / "log"), root / "ckpt"


def test_tp2_gradients_are_one_process_gradients(tmp_path):
    # Every parameter's gradient, in canonical layout, off the initial values. The shared output
    # norm weight is the one a rank applies to its own heads only: its gradient must be summed
    # over the ranks (a rank's own part is about half of it).
    torchrun(2, "gradients", "--out", str(tmp_path / "grads.pt"), "--", *GDN, script=Path(__file__))
    expected = gradients(*build_model(GDN))
    got = torch.load(tmp_path / "grads.pt")
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        # Partial sums of the row-parallel projections in another order: float32 noise, ~1e-7
        # of the largest entry.
        error = (got[name] - want).abs().max() / want.abs().max()
        assert error < 1e-5, (name, error.item())


def gradients(model, config) -> dict[str, torch.Tensor]:
    """d(mean squared logits)/d(parameter) at `fixed_batch`, the parameters first moved off
    their structured initial values, by name."""
    perturb_parameters(model, seed=1)
    model(fixed_batch(config.vocab_size)).float().pow(2).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def gradient_worker(argv: list[str]) -> None:
    """Under torchrun: build the model of the trainer flags after `--`, split it with tensor
    parallelism over all ranks, and write to --out (rank 0) `gradients`, each whole and in
    canonical layout."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from megatron_hybrid.parallel.dims import ParallelDims
    from megatron_hybrid.parallel.distributed import end_successful_run
    from megatron_hybrid.parallel.packed import packed_tensors
    from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel

    split = argv.index("--")
    out = argv[argv.index("--out") + 1]
    dist.init_process_group("gloo")
    model, config = build_model(argv[split + 1 :])
    perturb_parameters(model, seed=1)  # before the split: the same values as one process's
    mesh = ParallelDims(dist.get_world_size(), tp=dist.get_world_size()).build_mesh("cpu")
    apply_tensor_parallel(model, mesh["tp"], log=lambda _: None)
    model(fixed_batch(config.vocab_size)).float().pow(2).mean().backward()
    packed = packed_tensors(model)
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = packed[name].to_canonical_layout(grad) if name in packed else grad
    if dist.get_rank() == 0:
        torch.save(grads, out)
    # Not a bare destroy_process_group: gloo threads outliving it can abort the exit
    # (parallel/distributed.py exit_without_finalization says why).
    end_successful_run()


def test_tp2_matches_one_process(single, tp2):
    # rtol 1e-5 over 6 steps: the same float32 math with tensor-parallel partial sums reduced
    # in another order (a few ulps per step), which Adam's normalized updates keep small.
    assert_close(tp2[0], single[0])


def test_tp2_checkpoint_resumes_in_one_process(single, tp2):
    resumed = train_one_process(*GDN, "--load", str(tp2[1]), "--ckpt-step", "3")
    assert_close(resumed, single[0][3:])


def test_checkpoint_moves_exactly_between_one_process_and_tp2(single, tmp_path):
    # tp2 (with sequence parallelism) loads the one-process checkpoint with the same logits and
    # saves it back bit for bit; that tp2 checkpoint then gives one process the same logits.
    source = single[1] / "iter_0000003"
    assert_loads_exactly(source, GDN, tmp_path, "--tp", "2", *SP)
    resaved = one_process_logits(tmp_path / "resaved", GDN)
    assert resaved.equal(one_process_logits(source, GDN))


if __name__ == "__main__":
    if sys.argv[1:2] == ["gradients"]:
        gradient_worker(sys.argv[2:])
