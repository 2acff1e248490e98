"""Expert parallelism (all-to-all token dispatch) and tensor parallelism of MoE layers, through
torchrun (gloo, CPU, float32): every layout computes what one process computes, trains to the
same losses and gradient norms, and checkpoints move between expert/tensor-parallel and
single-process layouts (SwiGLU experts' packed fc1 included). Layouts that do not fit stop with
messages naming the flags.

Run as a script under torchrun, this file is the worker of the gradient tests (`__main__`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import launch
import pytest
import torch
from conftest import small_config
from test_tensor_parallel import assert_loads_exactly, assert_same_model_state
from test_training import TINY

from megatron_hybrid.data.tokenizer import build_tokenizer
from megatron_hybrid.parallel.dims import ParallelConfigError, ParallelDims
from megatron_hybrid.parallel.tensor_parallel import tensor_parallel_problems
from megatron_hybrid.training.arguments import build_parser, model_config_from_args
from megatron_hybrid.training.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
# Fused groups, stand-alone and fused E layers, shared experts; expert bias exercises the
# summed token counts. (--moe-aux-loss-coeff defaults to 1e-2: the aux loss is on.)
MOE = ["--moe-router-enable-expert-bias", "--moe-shared-expert-intermediate-size", "16"]
FLAGS = [
    *TINY,
    "--hybrid-layer-pattern",
    "M[*E]M[M-]E",
    *MOE,
    "--global-batch-size",
    "8",
    "--train-iters",
    "6",
    "--log-interval",
    "1",
    "--device",
    "cpu",
]
# Tensor-parallel layouts: MoE beside the mixers whose tensor-parallel plans are older.
TP_PATTERN = ["--hybrid-layer-pattern", "[*E]-E"]
# SwiGLU: the experts' fc1 [E, 2F, H] packs [gate; up] on dim 1 (so do the shared experts' and
# the MLP's fc1 on their rows).
SWIGLU_TP = [*FLAGS, *TP_PATTERN, "--swiglu"]


def torchrun_metrics(nproc: int, *flags: str, log_dir: Path) -> list[dict]:
    proc = launch.torchrun(
        nproc, launch.TRAIN_SCRIPT, *flags, "--log-dir", str(log_dir), check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(log_dir)


def one_process_metrics(*flags: str, log_dir: Path) -> list[dict]:
    run_training(build_parser().parse_args([*flags, "--log-dir", str(log_dir)]))
    return read_metrics(log_dir)


def read_metrics(log_dir: Path) -> list[dict]:
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def assert_same_training(got: list[dict], expected: list[dict], rtol: float = 1e-5) -> None:
    """Same losses and gradient norms, iteration by iteration (the norms catch a wrong gradient
    scale on the experts, which moves the losses only slowly)."""
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=rtol), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rtol), (a, b)


def config_of(*flags: str):
    """The model config the trainer builds from `flags`."""
    args = build_parser().parse_args(list(flags))
    return model_config_from_args(args, build_tokenizer(args).vocab_size)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> list[dict]:
    """The 6-iteration run on one process that every expert-parallel layout must reproduce."""
    return one_process_metrics(*FLAGS, log_dir=tmp_path_factory.mktemp("single"))


def test_expert_parallel_training_matches_one_process(tmp_path, single_process):
    ep2 = torchrun_metrics(2, *FLAGS, "--expert-model-parallel-size", "2", log_dir=tmp_path)
    assert_same_training(ep2, single_process)


@pytest.mark.parametrize(
    "layout",
    [
        # 2 ranks, 2 experts each; two micro-batches per rank (FSDP no-sync on the first) and
        # selective activation checkpointing (the all-to-all runs again in recompute).
        pytest.param(("2", "--ep", "2", "--recompute", "selective"), id="ep2-accumulation-sac"),
        # 4 ranks: experts split over ep and FSDP-sharded over edp (2-D mesh for the experts).
        pytest.param(("4", "--ep", "2"), id="edp2xep2"),
        # 4 ranks: expert weights on the 2-D (ep, tp) mesh, shared experts column/row parallel.
        pytest.param(("4", "--ep", "2", "--tp", "2", *TP_PATTERN), id="ep2xtp2"),
        # The same with SwiGLU: fc1 rank-major on its packed dim 1, then split over (ep, tp).
        pytest.param(("4", "--ep", "2", "--tp", "2", *TP_PATTERN, "--swiglu"), id="ep2xtp2-swiglu"),
    ],
)
def test_expert_parallel_gradients_and_logits_match_one_process(layout):
    nproc, *args = layout
    proc = launch.torchrun(int(nproc), Path(__file__), *args, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "gradients match" in proc.stdout


@pytest.mark.skipif(
    bool(tensor_parallel_problems(config_of(*FLAGS, *TP_PATTERN), 2)),
    reason="tensor_parallel_problems still refuses this pattern at tp=2",
)
def test_tensor_parallel_moe_training_matches_one_process(tmp_path):
    flags = [*FLAGS, *TP_PATTERN]
    tp2 = torchrun_metrics(2, *flags, "--tensor-model-parallel-size", "2", log_dir=tmp_path / "tp2")
    assert_same_training(tp2, one_process_metrics(*flags, log_dir=tmp_path / "single"))


@pytest.fixture(scope="module")
def swiglu_tp(tmp_path_factory) -> dict[str, tuple[list[dict], Path]]:
    """SWIGLU_TP trained for 6 iterations on one process and on tp2, each saving at iterations 3
    and 6: {"single": (metrics, checkpoint directory), "tp2": (...)}."""
    root = tmp_path_factory.mktemp("swiglu_tp")
    save = ["--save-interval", "3", "--save"]
    single = one_process_metrics(
        *SWIGLU_TP, *save, str(root / "single"), log_dir=root / "single_log"
    )
    tp2 = torchrun_metrics(
        2,
        *SWIGLU_TP,
        "--tensor-model-parallel-size",
        "2",
        *save,
        str(root / "tp2"),
        log_dir=root / "tp2_log",
    )
    return {"single": (single, root / "single"), "tp2": (tp2, root / "tp2")}


def test_tensor_parallel_swiglu_moe_training_matches_one_process(swiglu_tp):
    assert_same_training(swiglu_tp["tp2"][0], swiglu_tp["single"][0])


def test_tensor_parallel_swiglu_moe_checkpoint_is_canonical(swiglu_tp):
    fc1 = assert_same_model_state(swiglu_tp["tp2"][1], swiglu_tp["single"][1], iteration=3)[
        "decoder.layers.1.mlp.experts.linear_fc1.weight"
    ]
    assert tuple(fc1.shape) == (4, 2 * 24, 32)  # whole experts, [gate; up]


def test_tensor_parallel_swiglu_moe_checkpoint_resumes_in_one_process(tmp_path, swiglu_tp):
    resumed = one_process_metrics(
        *SWIGLU_TP, "--load", str(swiglu_tp["tp2"][1]), "--ckpt-step", "3", log_dir=tmp_path
    )
    assert_same_training(resumed, swiglu_tp["single"][0][3:])


def test_tp2_x_dp2_swiglu_moe_resumes_a_one_process_checkpoint(tmp_path, swiglu_tp):
    # Four ranks: FSDP shards the tensor-parallel expert shards again (over the experts), so a
    # rank's box of the rank-major fc1 is cut on two dims; it loads and saves canonically.
    single, single_dir = swiglu_tp["single"]
    resumed = torchrun_metrics(
        4,
        *SWIGLU_TP,
        "--tensor-model-parallel-size",
        "2",
        "--load",
        str(single_dir),
        "--ckpt-step",
        "3",
        "--save",
        str(tmp_path / "ckpt"),
        log_dir=tmp_path / "log",
    )
    assert_same_training(resumed, single[3:])
    assert_same_model_state(tmp_path / "ckpt", single_dir, iteration=6)


@pytest.mark.parametrize(
    "nproc, layout",
    [
        pytest.param(2, ("--tp", "2"), id="tp2"),
        # Expert weights on the 2-D (ep, tp) mesh: each rank saves and loads a box of both dims.
        pytest.param(4, ("--tp", "2", "--ep", "2"), id="ep2xtp2"),
    ],
)
def test_one_process_swiglu_moe_checkpoint_loads_exactly_under_tensor_parallelism(
    tmp_path, swiglu_tp, nproc, layout
):
    assert_loads_exactly(
        swiglu_tp["single"][1] / "iter_0000003", SWIGLU_TP, tmp_path, *layout, nproc=nproc
    )


def test_expert_parallel_checkpoints_move_to_one_process_and_back(tmp_path, single_process):
    ep2_dir, single_dir = tmp_path / "ep2", tmp_path / "single"
    # ep2 saves at iteration 3; one process resumes and finishes like the straight run.
    torchrun_metrics(
        2,
        *FLAGS,
        "--expert-model-parallel-size",
        "2",
        "--save",
        str(ep2_dir),
        "--exit-interval",
        "3",
        log_dir=tmp_path / "log_a",
    )
    resumed = one_process_metrics(*FLAGS, "--load", str(ep2_dir), log_dir=tmp_path / "log_b")
    assert_same_training(resumed, single_process[3:])
    # The files hold whole experts under canonical keys, whatever the layout that wrote them.
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(ep2_dir / "iter_0000003")).read_metadata()
    assert tuple(
        saved.state_dict_metadata["model.decoder.layers.2.mlp.experts.linear_fc1.weight"].size
    ) == (4, 24, 32)
    # One process saves at iteration 3: it gives the same logits as the ep2 checkpoint...
    one_process_metrics(
        *FLAGS, "--save", str(single_dir), "--exit-interval", "3", log_dir=tmp_path / "log_c"
    )
    torch.testing.assert_close(
        checkpoint_logits(single_dir), checkpoint_logits(ep2_dir), rtol=1e-4, atol=1e-5
    )
    # ... and ep2 resumes from it like the straight run.
    ep2 = torchrun_metrics(
        2,
        *FLAGS,
        "--expert-model-parallel-size",
        "2",
        "--load",
        str(single_dir),
        log_dir=tmp_path / "log_d",
    )
    assert_same_training(ep2, single_process[3:])


def checkpoint_logits(directory: Path) -> torch.Tensor:
    from megatron_hybrid.checkpointing.manager import load_checkpoint
    from megatron_hybrid.model import HybridModel

    config = config_of(*FLAGS)
    model = HybridModel(config, seed=999)  # other initial weights: the load must replace all
    load_checkpoint(directory, model, None, config)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids)


# -- layouts that do not fit -------------------------------------------------------------------
def test_experts_not_divisible_by_expert_parallel_size_are_refused():
    with pytest.raises(ParallelConfigError) as error:
        ParallelDims(world_size=4, ep=4).check_fits(small_config("M[*E]E", num_moe_experts=6))
    assert (
        "--num-experts 6 is not divisible by --expert-model-parallel-size 4; valid "
        "expert-parallel sizes: 1, 2, 3, 6"
    ) in str(error.value)


def test_expert_parallel_without_moe_layers_is_refused():
    with pytest.raises(
        ParallelConfigError,
        match="has no MoE \\(E\\) layers to split; use --expert-model-parallel-size 1",
    ):
        ParallelDims(world_size=2, ep=2).check_fits(small_config("M*-"))


def test_expert_parallel_larger_than_data_parallel_is_refused():
    with pytest.raises(
        ParallelConfigError, match="expert parallel size 4 must divide the data-parallel size 2"
    ):
        ParallelDims(world_size=4, tp=2, ep=4)


def test_moe_widths_not_divisible_by_tensor_parallel_size_are_refused():
    config = small_config("[*E]-", moe_ffn_hidden_size=25, moe_shared_expert_intermediate_size=15)
    with pytest.raises(ParallelConfigError) as error:
        ParallelDims(world_size=2, tp=2).check_fits(config)
    message = str(error.value)
    assert "--moe-ffn-hidden-size 25 is not divisible by --tensor-model-parallel-size 2" in message
    assert (
        "--moe-shared-expert-intermediate-size 15 is not divisible by "
        "--tensor-model-parallel-size 2"
    ) in message


@pytest.mark.parametrize(
    "world_size, ep, tp", [(2, 2, 1), (2, 1, 2), (4, 2, 2)], ids=["ep2", "tp2", "ep2xtp2"]
)
def test_swiglu_experts_fit_expert_and_tensor_parallelism(world_size, ep, tp):
    ParallelDims(world_size=world_size, ep=ep, tp=tp).check_fits(
        small_config("M[*E]E", activation="swiglu")
    )


# -- the worker of the gradient tests ----------------------------------------------------------
def language_model_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of materialized logits, in float32 (the reference)."""
    return torch.nn.functional.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten())


def gradient_worker(argv: list[str]) -> None:
    """Build the model in the layout the arguments give (--ep, --tp, --recompute, pattern
    flags) and one unsharded reference on every rank; run the same global batch through both
    (the reference as one process would, in micro-batches of the same size) and check the
    logits and every parameter's gradient."""
    import argparse

    from megatron_hybrid.model import HybridModel
    from megatron_hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
    from megatron_hybrid.parallel.distributed import end_successful_run, init_distributed
    from megatron_hybrid.parallel.expert_parallel import apply_expert_parallel
    from megatron_hybrid.parallel.fsdp import apply_fsdp
    from megatron_hybrid.parallel.packed import packed_tensors
    from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--recompute", default=None)
    own, model_flags = parser.parse_known_args(argv)
    args = build_parser().parse_args([*FLAGS, *model_flags])
    proc = init_distributed("cpu")
    dims = ParallelDims(proc.world_size, tp=own.tp, ep=own.ep)
    config = config_of(*FLAGS, *model_flags)
    mesh = dims.build_mesh("cpu")

    reference = HybridModel(config, seed=args.seed).train()
    model = HybridModel(config, seed=args.seed).train()
    if own.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], log=lambda _: None)
    apply_expert_parallel(model, mesh, log=lambda _: None)
    if own.recompute:
        apply_activation_checkpointing(model, own.recompute, log=lambda _: None)
    apply_fsdp(model, mesh, bf16=False, log=lambda _: None)

    micro_batches_per_rank, mbs = 2 if own.recompute else 1, 2
    num_micro = micro_batches_per_rank * dims.dp
    ids = torch.randint(0, 256, (num_micro * mbs, 25), generator=torch.Generator().manual_seed(7))
    micro = list(ids.split(mbs))
    reference.set_aux_loss_grad_scale(1.0 / num_micro)
    model.set_aux_loss_grad_scale(1.0 / micro_batches_per_rank)
    for batch in micro:
        language_model_loss(reference(batch[:, :-1]), batch[:, 1:]).div(num_micro).backward()
    dp_rank = mesh["dp_shard"].get_local_rank()
    for j in range(micro_batches_per_rank):
        batch = micro[j * dims.dp + dp_rank]
        model.set_requires_gradient_sync(j == micro_batches_per_rank - 1)
        logits = model(batch[:, :-1])
        with torch.no_grad():
            torch.testing.assert_close(logits, reference(batch[:, :-1]), rtol=1e-5, atol=1e-6)
        language_model_loss(logits, batch[:, 1:]).div(micro_batches_per_rank).backward()

    expected = dict(reference.named_parameters())
    packed = packed_tensors(model)
    for name, param in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        grad = param.grad.full_tensor()  # every rank, same order: a collective
        if name in packed:  # stored rank-major
            grad = packed[name].to_canonical_layout(grad)
        torch.testing.assert_close(
            grad, expected[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
    print(f"rank {proc.rank}: logits and gradients match one process", flush=True)
    end_successful_run()


if __name__ == "__main__":
    gradient_worker(sys.argv[1:])
