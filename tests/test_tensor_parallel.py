"""Tensor parallelism of Mamba2, attention and MLPs, with and without sequence parallelism
(torchrun, gloo, CPU, float32): the same losses as one process, and checkpoints that stay
canonical, so they move between layouts.

Run as a script under torchrun (`worker` mode) it loads a checkpoint into a tensor-parallel
model, writes the logits of a fixed batch and can save the model back."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import launch
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import TINY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Fused groups, Mamba, attention and MLP; two micro-batches per step (gradient accumulation).
PATTERN = "[M-]M[*-]M-"
FLAGS = [
    *TINY,
    "--hybrid-layer-pattern",
    PATTERN,
    "--global-batch-size",
    "8",
    "--train-iters",
    "6",
    "--log-interval",
    "1",
    "--device",
    "cpu",
]
SWIGLU = [*FLAGS, "--swiglu"]
TP2 = ["--tensor-model-parallel-size", "2"]
SP = ["--sequence-parallel"]


def torchrun(
    nproc: int, *args: str, script=REPO / "scripts" / "pretrain_hybrid.py", check: bool = True
) -> subprocess.CompletedProcess:
    return launch.torchrun(nproc, script, *args, check=check)


def train_torchrun(nproc: int, *flags: str, log_dir: Path) -> list[float]:
    torchrun(nproc, *flags, "--log-dir", str(log_dir))
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def train_one_process(*flags: str) -> list[float]:
    from megatron_hybrid.training.arguments import build_parser
    from megatron_hybrid.training.trainer import run_training

    return run_training(build_parser().parse_args(list(flags))).losses


def assert_close(a, b, rtol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=rtol)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The SwiGLU run in one process, saving at iterations 3 and 6."""
    save = tmp_path_factory.mktemp("single")
    losses = train_one_process(*SWIGLU, "--save", str(save), "--save-interval", "3")
    return losses, save


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """The same run with tensor parallelism 2, saving at iterations 3 and 6."""
    root = tmp_path_factory.mktemp("tp2")
    losses = train_torchrun(
        2, *SWIGLU, *TP2, "--save", str(root / "ckpt"), "--save-interval", "3", log_dir=root / "log"
    )
    return losses, root / "ckpt"


# -- loss parity -------------------------------------------------------------------------------


def test_tp2_swiglu_matches_one_process(single, tp2):
    assert_close(tp2[0], single[0])


def test_tp2_squared_relu_matches_one_process(tmp_path):
    assert_close(train_torchrun(2, *FLAGS, *TP2, log_dir=tmp_path), train_one_process(*FLAGS))


def test_sequence_parallel_with_moe_and_recompute_matches_one_process(tmp_path):
    # The MoE layer sees the gathered sequence; the expert bias exercises its token counts.
    flags = [
        *FLAGS,
        "--hybrid-layer-pattern",
        "[M-]M[*E]M-",
        "--train-iters",
        "5",
        "--moe-shared-expert-intermediate-size",
        "16",
        "--moe-router-enable-expert-bias",
        "--recompute-granularity",
        "selective",
    ]
    assert_close(train_torchrun(2, *flags, *TP2, *SP, log_dir=tmp_path), train_one_process(*flags))


# -- checkpoints -------------------------------------------------------------------------------


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {key: tuple(meta.size) for key, meta in metadata.items() if hasattr(meta, "size")}


def test_tp2_checkpoint_has_canonical_keys_and_shapes(single, tp2):
    from megatron_hybrid.config import ModelConfig

    tp_shapes = saved_shapes(tp2[1] / "iter_0000003")
    assert tp_shapes == saved_shapes(single[1] / "iter_0000003")  # model and optimizer
    config = ModelConfig(
        **json.loads((tp2[1] / "iter_0000003" / "checkpoint.json").read_text())["model_config"]
    )
    mixer = "model.decoder.layers.0.mixer."
    assert tp_shapes[mixer + "in_proj.weight"] == (config.mamba_in_proj_dim, 32)
    assert tp_shapes[mixer + "conv1d.weight"] == (config.mamba_conv_dim, 1, 4)
    assert tp_shapes[mixer + "dt_bias"] == (config.mamba_num_heads,)
    assert tp_shapes["model.decoder.layers.1.mlp.linear_fc1.weight"] == (2 * 48, 32)
    assert (
        tp_shapes["optimizer.state.decoder.layers.0.mixer.in_proj.weight.exp_avg"]
        == tp_shapes[mixer + "in_proj.weight"]
    )


def test_tp2_checkpoint_values_are_canonical(single, tp2):
    assert_same_model_state(tp2[1], single[1], iteration=3)


def assert_same_model_state(got: Path, expected: Path, iteration: int) -> dict:
    """The same training in two layouts saved the same canonical model tensors, to float32 noise
    (a packed row saved in the wrong place would differ by O(0.1)); returns `expected`'s."""
    from megatron_hybrid.checkpointing.consolidated import read_model_state

    got_state, _, _ = read_model_state(got, iteration=iteration)
    expected_state, _, _ = read_model_state(expected, iteration=iteration)
    assert got_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        torch.testing.assert_close(got_state[key], value, rtol=1e-3, atol=1e-4, msg=key)
    return expected_state


def test_tp2_checkpoint_resumes_in_one_process(single, tp2):
    resumed = train_one_process(*SWIGLU, "--load", str(tp2[1]), "--ckpt-step", "3")
    assert_close(resumed, single[0][3:])


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_one_process_checkpoint_loads_in_tp2_with_the_same_logits(
    single, tmp_path, sequence_parallel
):
    assert_loads_exactly(
        single[1] / "iter_0000003",
        SWIGLU,
        tmp_path,
        "--tp",
        "2",
        *(SP if sequence_parallel else []),
    )


def assert_loads_exactly(
    source: Path, flags: list[str], tmp_path: Path, *layout: str, nproc: int = 2
) -> None:
    """Exact both ways: the `worker` layout loads the one-process checkpoint `source` of the
    model `flags` build (same logits, on a length tp does not divide), saves it again, and the
    saved tensors are bit-identical to the originals."""
    torchrun(
        nproc,
        "worker",
        *layout,
        "--load",
        str(source),
        "--logits",
        str(tmp_path / "logits.pt"),
        "--save",
        str(tmp_path / "resaved"),
        "--",
        *flags,
        script=Path(__file__),
    )
    expected = one_process_logits(source, flags)
    loaded_by_dcp, loaded_whole = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(loaded_by_dcp, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_whole, expected, rtol=1e-5, atol=1e-5)

    from megatron_hybrid.checkpointing.consolidated import read_model_state

    resaved, _, _ = read_model_state(tmp_path / "resaved")
    original, _, _ = read_model_state(source)
    assert resaved.keys() == original.keys()
    for key in original:
        assert torch.equal(resaved[key], original[key]), key


def test_tp2_x_dp2_with_sequence_parallel_resumes_a_one_process_checkpoint(single, tmp_path):
    # Four ranks: FSDP shards each tensor-parallel shard again, so a rank's rows of a packed
    # weight start mid-part; loading and saving still go through canonical offsets.
    losses = train_torchrun(
        4,
        *SWIGLU,
        *TP2,
        *SP,
        "--load",
        str(single[1]),
        "--ckpt-step",
        "3",
        "--save",
        str(tmp_path / "ckpt"),
        log_dir=tmp_path / "log",
    )
    assert_close(losses, single[0][3:])
    assert_same_model_state(tmp_path / "ckpt", single[1], iteration=6)


# -- the packed layout ------------------------------------------------------------------------


def test_rank_major_rows_map_back_to_canonical_offsets():
    from megatron_hybrid.parallel.packed import PackedRows

    packed = PackedRows(parts=(4, 4, 2, 2, 2), tp=2)  # z, x, B, C, dt of a tiny Mamba2
    canonical = torch.arange(14)
    rank_major = packed.to_rank_major(canonical)
    # Rank 0 holds the first half of every part, rank 1 the second half.
    assert rank_major[:7].tolist() == [0, 1, 4, 5, 8, 10, 12]
    assert rank_major[7:].tolist() == [2, 3, 6, 7, 9, 11, 13]
    assert torch.equal(packed.to_canonical_layout(rank_major), canonical)
    # Rows 3..8 of the rank-major layout (an FSDP shard crossing the tp boundary), as runs of
    # (offset in the shard, canonical row, length):
    assert packed.runs(3, 9) == [(0, 5, 1), (1, 8, 1), (2, 10, 1), (3, 12, 1), (4, 2, 2)]
    for offset, row, length in packed.runs(3, 9):
        assert rank_major[3 + offset : 3 + offset + length].tolist() == list(
            range(row, row + length)
        )


def test_packed_dimension_can_be_another_than_rows():
    from megatron_hybrid.parallel.packed import PackedRows

    packed = PackedRows(parts=(2, 2), tp=2, dim=1)  # e.g. experts' fc1 [E, gate; up, H]
    canonical = torch.arange(24).view(2, 4, 3)
    rank_major = packed.to_rank_major(canonical)
    assert torch.equal(rank_major[:, 1], canonical[:, 2])  # rank 0: gate row 0, up row 0
    assert torch.equal(packed.to_canonical_layout(rank_major), canonical)


@pytest.fixture
def tp1_model():
    """A swiglu Mamba2 + MLP model under one-rank tensor parallelism (in this process, gloo):
    its packed weights are DTensors marked packed, as under any tp; and its AdamW after a step
    (so the packed weights have moments). The process group is torn down afterwards."""
    import torch.distributed as dist
    from conftest import small_config
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_hybrid.model import HybridModel
    from megatron_hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
    from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel
    from megatron_hybrid.training.optimizer import build_optimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = small_config("M-", activation="swiglu")
        model = HybridModel(config)
        apply_tensor_parallel(model, init_device_mesh("cpu", (1,)), log=lambda _: None)
        apply_activation_checkpointing(model, "full", log=lambda _: None)
        optimizer = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95), 1e-8, foreach=False)
        model(torch.randint(0, config.vocab_size, (1, 8))).float().pow(2).mean().backward()
        optimizer.step()
        yield model, optimizer, config.pattern
    finally:
        dist.destroy_process_group()


def test_every_packed_tensor_is_checkpointed_in_its_canonical_view(tp1_model):
    from megatron_hybrid.canonical import canonical_key
    from megatron_hybrid.checkpointing.packed_views import is_canonical_view
    from megatron_hybrid.checkpointing.state import ModelState, OptimizerState
    from megatron_hybrid.parallel.packed import packed_tensors

    model, optimizer, pattern = tp1_model
    packed = {canonical_key(name, pattern) for name in packed_tensors(model)}
    assert len(packed) == 4  # in_proj, conv1d weight and bias, SwiGLU's linear_fc1
    views = {
        key
        for key, value in ModelState(model, pattern).state_dict().items()
        if is_canonical_view(value)
    }
    assert views == packed
    moments = OptimizerState(model, optimizer, pattern).state_dict()["state"]
    assert {key for key, state in moments.items() if is_canonical_view(state["exp_avg"])} == packed


def test_a_packed_tensor_the_saver_cannot_find_is_an_error_naming_it(tp1_model, monkeypatch):
    # A wrapper module that torch's state dict leaves out of names but parallel/packed.py does
    # not know (as if torch wrapped blocks in a new one): the packed tensors are then looked up
    # under names the state dict does not use, and would be saved rank-major.
    from megatron_hybrid.checkpointing.errors import PackedTensorNotFoundError
    from megatron_hybrid.checkpointing.state import ModelState, OptimizerState
    from megatron_hybrid.parallel import packed

    model, optimizer, pattern = tp1_model
    monkeypatch.setattr(
        packed, "_WRAPPER_NAMES", packed._WRAPPER_NAMES - {"_checkpoint_wrapped_module"}
    )
    unknown = "decoder.layers.0._checkpoint_wrapped_module.sequence_mixer.in_proj.weight"
    saved_as = "decoder.layers.0.sequence_mixer.in_proj.weight"
    for state in (ModelState(model, pattern), OptimizerState(model, optimizer, pattern)):
        with pytest.raises(PackedTensorNotFoundError) as error:
            state.state_dict()
        message = str(error.value)
        assert "4 packed tensor(s) not found" in message
        assert f"  {unknown}; " in message and saved_as in message
        assert "_WRAPPER_NAMES" in message
    with pytest.raises(PackedTensorNotFoundError, match="not found in the model state dict"):
        ModelState(model, pattern).load_state_dict({})


# -- layouts that do not fit -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tp, overrides, message",
    [
        (2, dict(mamba_num_groups=1), "--mamba-num-groups 1 is not divisible"),
        (4, dict(mamba_num_heads=6, mamba_num_groups=2), "--mamba-num-heads 6 is not divisible"),
        (
            2,
            dict(num_attention_heads=3, num_query_groups=3, kv_channels=8),
            "--num-attention-heads 3 is not divisible",
        ),
        (2, dict(ffn_hidden_size=49), "--ffn-hidden-size 49 is not divisible"),
    ],
)
def test_sizes_that_do_not_divide_are_named(tp, overrides, message):
    from conftest import small_config

    from megatron_hybrid.parallel.tensor_parallel import tensor_parallel_problems

    problems = tensor_parallel_problems(small_config("M*-", **overrides), tp)
    assert any(message in problem for problem in problems), problems


def test_moe_layers_are_left_to_their_own_checks():
    from conftest import small_config

    from megatron_hybrid.parallel.tensor_parallel import tensor_parallel_problems

    assert tensor_parallel_problems(small_config("M[*E]-"), 2) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sequence-parallel"], "needs --tensor-model-parallel-size 2 or more"),
        ([*TP2, *SP, "--seq-length", "25"], "--seq-length 25 must be divisible by"),
    ],
)
def test_sequence_parallel_flags_that_do_not_fit_are_refused(flags, message):
    from megatron_hybrid.training.arguments import build_parser, check_training_args

    with pytest.raises(ValueError, match=message):
        check_training_args(build_parser().parse_args([*FLAGS, *flags]))


def test_a_layout_that_does_not_fit_stops_with_a_message():
    from conftest import small_config

    from megatron_hybrid.parallel.dims import ParallelConfigError, ParallelDims

    with pytest.raises(
        ParallelConfigError,
        match="--mamba-num-groups 1 is not divisible by --tensor-model-parallel-size 2",
    ):
        ParallelDims(world_size=2, tp=2).check_fits(small_config(PATTERN, mamba_num_groups=1))


# -- the worker ----------------------------------------------------------------------------


def fixed_batch(vocab_size: int) -> torch.Tensor:
    # 23 tokens: sequence parallelism pads a length tp does not divide.
    return torch.randint(0, vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))


def one_process_logits(checkpoint: Path, flags: list[str]) -> torch.Tensor:
    from megatron_hybrid.checkpointing.manager import load_checkpoint

    model, config = build_model(flags)
    load_checkpoint(checkpoint, model, None, config)
    with torch.no_grad():
        return model(fixed_batch(config.vocab_size))


def build_model(flags):
    from megatron_hybrid.data.tokenizer import build_tokenizer
    from megatron_hybrid.model import HybridModel
    from megatron_hybrid.training.arguments import (
        build_parser,
        check_training_args,
        model_config_from_args,
    )

    args = build_parser().parse_args(list(flags))
    check_training_args(args)
    config = model_config_from_args(args, build_tokenizer(args).vocab_size)
    return HybridModel(config, seed=args.seed), config


def worker(argv: list[str]) -> None:
    """Under torchrun: build the model of the trainer flags after `--`, shard it over all ranks
    with tensor parallelism (and --sequence-parallel; MoE layers over --tp and --ep), load
    --load, and write to --logits (rank 0) the logits of `fixed_batch` -- loaded by DCP, and
    loaded as whole canonical tensors into a second such model; with --save, save the first
    (model-only checkpoint, iteration 0)."""
    import torch.distributed as dist

    from megatron_hybrid.checkpointing.consolidated import read_model_state
    from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
    from megatron_hybrid.checkpointing.state import ModelState
    from megatron_hybrid.parallel.dims import ParallelDims
    from megatron_hybrid.parallel.distributed import end_successful_run
    from megatron_hybrid.parallel.expert_parallel import apply_expert_parallel
    from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel

    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--load", required=True)
    parser.add_argument("--logits", required=True)
    parser.add_argument("--save")
    parser.add_argument("--sequence-parallel", action="store_true")
    opts = parser.parse_args(argv[:split])
    dist.init_process_group("gloo")
    flags = argv[split + 1 :]
    by_dcp, config = build_model(flags)
    whole, _ = build_model(flags)
    dims = ParallelDims(dist.get_world_size(), tp=opts.tp, ep=opts.ep)
    dims.check_fits(config)
    mesh = dims.build_mesh("cpu")
    for model in (by_dcp, whole):
        apply_tensor_parallel(
            model, mesh["tp"], sequence_parallel=opts.sequence_parallel, log=lambda _: None
        )
        apply_expert_parallel(model, mesh, log=lambda _: None)
    load_checkpoint(opts.load, by_dcp, None, config)
    ModelState(whole, config.pattern).load_state_dict(read_model_state(opts.load)[0])
    with torch.no_grad():
        logits = [model(fixed_batch(config.vocab_size)) for model in (by_dcp, whole)]
    if dist.get_rank() == 0:
        torch.save(logits, opts.logits)
    if opts.save:
        CheckpointSaver(opts.save, log=lambda _: None).save(0, by_dcp, None, None, config)
    end_successful_run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2:])
