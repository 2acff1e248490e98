"""The training script's end-of-run sample decodes a whole-model copy of its parallel part
(megatron_hybrid/parallel/whole_model.py): under tensor parallelism (with sequence parallelism and
selective recompute) and under FSDP with expert parallelism the copy holds exactly the one-process
model's tensors and generates its tokens (torchrun, gloo, CPU, float32).

Run as a script under torchrun (`worker` mode) it parallelizes the model, copies it whole and
writes the copy's tensors and greedy tokens (rank 0)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import launch
import pytest
import torch
from conftest import perturb_parameters, small_config

from megatron_hybrid.generation import GREEDY, generate
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.whole_model import is_plain, whole_model

PATTERN = "[M-]M*E[*-]"
NEW_TOKENS = 12


def model() -> HybridModel:
    return perturb_parameters(HybridModel(small_config(PATTERN), seed=7))


def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (n,), generator=generator) for n in (9, 4)]


def test_a_plain_model_is_its_own_whole_model():
    plain = model()
    assert is_plain(plain) and whole_model(plain) is plain


@pytest.mark.parametrize(
    "layout",
    [
        ["--tp", "2", "--sequence-parallel", "--recompute", "selective"],
        ["--ep", "2"],  # data parallel 2: FSDP, the experts split over ep
    ],
    ids=["tp2-sp-recompute", "fsdp-ep2"],
)
def test_a_parallel_part_copies_whole_and_generates_the_one_process_tokens(tmp_path, layout):
    out = tmp_path / "copy.pt"
    launch.torchrun(2, Path(__file__), "worker", *layout, "--out", str(out))
    result = torch.load(out)
    reference = model()
    expected = reference.state_dict()
    assert set(result["state"]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(result["state"][key], value), key
    tokens = generate(reference, prompts(), NEW_TOKENS, GREEDY)
    for ours, theirs in zip(result["tokens"], tokens, strict=True):
        torch.testing.assert_close(ours, theirs)


def worker(argv: list[str]) -> None:
    """Under torchrun: build `model()`, parallelize it as the trainer would, copy it whole on
    every rank, and write (rank 0) the copy's state dict and greedy tokens to --out."""
    import torch.distributed as dist

    from megatron_hybrid.parallel.distributed import end_successful_run
    from megatron_hybrid.parallel.parallelize import ParallelSettings, parallelize

    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--recompute")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args(argv)
    dist.init_process_group("gloo")
    settings = ParallelSettings(
        tensor_model_parallel_size=opts.tp,
        expert_model_parallel_size=opts.ep,
        sequence_parallel=opts.sequence_parallel,
        recompute_granularity=opts.recompute,
    )
    part = model()
    dims = settings.dims(dist.get_world_size())
    dims.check_fits(part.config)
    parallelize(part, dims, dims.build_mesh("cpu"), settings, bf16=False, log=lambda _: None)
    assert not is_plain(part)
    copy = whole_model(part)
    tokens = generate(copy, prompts(), NEW_TOKENS, GREEDY)
    if dist.get_rank() == 0:
        torch.save({"state": copy.state_dict(), "tokens": tokens}, opts.out)
    end_successful_run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2:])
