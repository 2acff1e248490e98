"""Every data-parallel sharding strategy (--data-parallel-sharding-strategy, and Megatron-LM's
--use-distributed-optimizer) trains the same model as one process, with gradient accumulation,
under tensor, pipeline and expert parallelism, and its checkpoints move to and from the other
layouts (torchrun, gloo, CPU, float32); the collectives of a step are those of each strategy,
and flags that contradict each other stop before any work.

Each torchrun launch runs many trainings in one worker (`run_cases`): a launch costs seconds of
start-up on 2 cores, an in-process training of the tiny model about one.

Tolerance rtol 1e-5 on losses, as every dp2 parity test (tests/test_parallel_layouts.py): the
same float32 math reduced in another order moves a loss by a few ulps per step, and Adam's
normalized updates keep that below ~1e-6 over these few steps. The gradient norm is above
--clip-grad 1.0 in these steps, so equal losses also mean equal clipped gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import FLAGS, assert_close, one_process
from test_parallel_layouts import EP2, FOUR_SEGMENTS, PP2, TP2
from test_tensor_parallel import one_process_logits
from test_tensor_parallel import torchrun as torchrun_script

from megatron_hybrid.parallel.data_parallel import (
    SHARDING_STRATEGIES,
    apply_data_parallel,
    resolve_sharding_strategy,
    sharding_strategy_problem,
)
from megatron_hybrid.training.arguments import build_parser, check_training_args
from megatron_hybrid.training.arguments import settings_from_args as settings_of

STRATEGY = "--data-parallel-sharding-strategy"
DIST_OPT = "--use-distributed-optimizer"
# Two micro-batches per rank on dp2: gradients are reduced after the second only.
ACCUMULATE = ["--global-batch-size", "16", "--train-iters", "4"]
TWO_MICRO_BATCHES = ACCUMULATE[:2]  # on dp2, over FLAGS' 6 iterations
EXIT_AT_3 = ["--exit-interval", "3"]


def run_cases(nproc: int, tmp_path: Path, cases: dict[str, list[str]], collectives: bool = False):
    """Train each case's flags (after FLAGS) in turn in one torchrun launch of `nproc` ranks:
    (losses by case, the launch's stdout, the collective counts of `count_collectives` when
    asked)."""
    spec, out = tmp_path / "cases.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"cases": cases, "collectives": collectives}))
    proc = torchrun_script(nproc, "worker", str(spec), str(out), script=Path(__file__))
    result = json.loads(out.read_text())
    return result["losses"], proc.stdout, result.get("collectives")


# -- flags ---------------------------------------------------------------------------------------


def strategy_of(*flags: str) -> str:
    return settings_of(build_parser().parse_args(list(flags))).parallel.sharding_strategy()


def test_default_is_megatrons_full_sharding():
    assert strategy_of() == "optim_grads_params"


def test_distributed_optimizer_alone_selects_optimizer_sharding():
    assert strategy_of(DIST_OPT) == "optim"


@pytest.mark.parametrize("strategy", SHARDING_STRATEGIES)
def test_a_given_strategy_is_the_one_that_runs(strategy):
    assert strategy_of(STRATEGY, strategy) == strategy
    if strategy != "no_shard":  # each of these shards the optimizer state too
        assert strategy_of(STRATEGY, strategy, DIST_OPT) == strategy


def test_replicating_the_optimizer_state_and_sharding_it_is_refused_before_any_work():
    args = build_parser().parse_args([STRATEGY, "no_shard", DIST_OPT])
    with pytest.raises(ValueError) as error:
        check_training_args(args)
    message = str(error.value)
    assert "--data-parallel-sharding-strategy no_shard" in message
    assert "--use-distributed-optimizer" in message
    assert "optim, optim_grads or optim_grads_params" in message  # what would be valid


def test_an_unknown_strategy_from_python_is_named_with_the_valid_ones():
    problem = sharding_strategy_problem("zero2", False)
    assert "'zero2'" in problem and "no_shard, optim, optim_grads, optim_grads_params" in problem
    assert sharding_strategy_problem(None, True) is None
    assert resolve_sharding_strategy(None, False) == "optim_grads_params"
    with pytest.raises(ValueError, match="'zero2' is not one of no_shard, optim"):
        apply_data_parallel(None, None, "zero2", bf16=False)  # before it touches anything


def test_an_unknown_strategy_flag_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([STRATEGY, "zero2"])
    assert "invalid choice: 'zero2'" in capsys.readouterr().err


def test_parallelize_hands_the_resolved_strategy_to_data_parallelism(monkeypatch):
    from conftest import small_config

    from megatron_hybrid.model import HybridModel
    from megatron_hybrid.parallel import parallelize as parallelize_module
    from megatron_hybrid.parallel.dims import ParallelDims
    from megatron_hybrid.parallel.parallelize import ParallelSettings, parallelize

    strategies = []
    monkeypatch.setattr(parallelize_module, "apply_expert_parallel", lambda *a, **k: None)
    monkeypatch.setattr(
        parallelize_module, "apply_data_parallel", lambda _, __, s, **k: strategies.append(s)
    )
    model = HybridModel(small_config("M-"))
    for settings in (
        ParallelSettings(use_distributed_optimizer=True),
        ParallelSettings(data_parallel_sharding_strategy="no_shard"),
        ParallelSettings(),
    ):
        parallelize(model, ParallelDims(2), object(), settings, bf16=False)
    parallelize(model, ParallelDims(1), None, ParallelSettings(), bf16=False)  # no dp: none
    assert strategies == ["optim", "no_shard", "optim_grads_params"]


def test_blocks_prefetch_the_next_two_in_forward_and_the_previous_two_in_backward():
    from megatron_hybrid.parallel.fsdp import set_block_prefetch

    class Unit:
        def __init__(self, name):
            self.name, self.forward, self.backward = name, None, None

        def set_modules_to_forward_prefetch(self, modules):
            self.forward = [m.name for m in modules]

        def set_modules_to_backward_prefetch(self, modules):
            self.backward = [m.name for m in modules]

    units = [Unit(i) for i in range(4)]
    set_block_prefetch(units)
    assert [u.forward for u in units] == [[1, 2], [2, 3], [3], None]
    assert [u.backward for u in units] == [None, [0], [1, 0], [2, 1]]


def test_the_throughput_benchmark_runs_each_data_parallel_layout_per_strategy(monkeypatch):
    """benchmarks/parallel_throughput.py --sharding-strategy: the GPU run measures dp2 under
    each strategy in one call, and hands each its flag (no GPU here: the launch is recorded,
    not run)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import parallel_throughput

    commands = []

    def launch(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "not run")

    monkeypatch.setattr(parallel_throughput.subprocess, "run", launch)
    strategies = ["--sharding-strategy", "no_shard", "--sharding-strategy", "optim_grads"]
    layouts = ["--layout", "1gpu", "--layout", "dp2", "--layout", "tp2", "--layout", "tp2-dp2"]
    parallel_throughput.main([*layouts, *strategies])
    sys.modules.pop("parallel_throughput", None)

    def strategy(command):
        return command[command.index(STRATEGY) + 1] if STRATEGY in command else None

    # 1gpu and tp2 have one data-parallel rank: one run each, under the default.
    assert [strategy(c) for c in commands] == [
        None,
        "no_shard",
        "optim_grads",
        None,
        "no_shard",
        "optim_grads",
    ]


# -- training and checkpoints over two ranks ------------------------------------------------------


@pytest.mark.slow
def test_every_strategy_trains_and_checkpoints_like_one_process(tmp_path):
    reference = one_process()
    accumulated = one_process(*ACCUMULATE)
    one = tmp_path / "one"  # one process's checkpoint at iteration 3
    one_process("--save", str(one), *EXIT_AT_3)

    def saving(name):
        return ["--save", str(tmp_path / name), *EXIT_AT_3]

    def loading(name):
        return ["--load", str(tmp_path / name)]

    cases = {
        **{s: [STRATEGY, s, *ACCUMULATE] for s in SHARDING_STRATEGIES},
        "distributed-optimizer": [DIST_OPT, *ACCUMULATE],
        "no_shard without accumulation": [STRATEGY, "no_shard"],
        # Saved under each strategy at iteration 3 ...
        "no_shard saves": [STRATEGY, "no_shard", *saving("no_shard")],
        "optim_grads saves": [STRATEGY, "optim_grads", *saving("optim_grads")],
        "full shard saves": saving("full"),
        # ... resumed under another.
        "full shard resumes no_shard": loading("no_shard"),
        "full shard resumes optim_grads": loading("optim_grads"),
        "no_shard resumes full shard": [STRATEGY, "no_shard", *loading("full")],
        "optim_grads resumes full shard": [STRATEGY, "optim_grads", *loading("full")],
        "no_shard resumes one process": [STRATEGY, "no_shard", *loading("one")],
        "optim_grads resumes one process": [STRATEGY, "optim_grads", *loading("one")],
    }
    losses, stdout, collectives = run_cases(2, tmp_path, cases, collectives=True)

    for strategy in [*SHARDING_STRATEGIES, "distributed-optimizer"]:
        assert_close(losses[strategy], accumulated)
    assert_close(losses["no_shard without accumulation"], reference)
    for saver in ("no_shard", "optim_grads", "full shard"):
        assert_close(losses[f"{saver} saves"], reference[:3])
    for resumed in [name for name in cases if " resumes " in name]:
        assert_close(losses[resumed], reference[3:])
    # One process resumes the no_shard and optim_grads checkpoints like its own, and their
    # weights are its own: three Adam steps turn float32 reduction-order noise into weight
    # differences of ~1e-6, so the O(1) logits agree to ~1e-5 (as for the tp2 x pp2 checkpoint
    # in tests/test_parallel_layouts.py); a mis-mapped or half-saved shard is off by O(1).
    for saver in ("no_shard", "optim_grads"):
        assert_close(one_process(*loading(saver)), reference[3:])
        torch.testing.assert_close(
            one_process_logits(tmp_path / saver, FLAGS),
            one_process_logits(one, FLAGS),
            rtol=1e-4,
            atol=1e-4,
        )

    # Each step logs the mode it runs.
    assert "DDP (replicate, ZeRO-0): 5 blocks + root replicated over 2" in stdout
    assert "FSDP2: 5 blocks + root over 2 data-parallel ranks (ZeRO-2: gradients" in stdout
    assert "FSDP2: 5 blocks + root over 2 data-parallel ranks (ZeRO-3: parameters" in stdout
    check_collective_counts(collectives)


def check_collective_counts(counts: dict[str, list[dict[str, int]]]) -> None:
    """Per strategy, the collectives of each of a step's two micro-batches on a model of
    `units` data-parallel units (5 blocks + the root): none reduces before the last
    micro-batch; no_shard gathers nothing and all-reduces each unit once; ZeRO-2 gathers each
    unit once per step; ZeRO-3 gathers every unit in each forward and again, for backward,
    those it freed after forward (all blocks but the last)."""
    units, blocks = 6, 5
    quiet = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
    assert counts["no_shard"] == [quiet, {**quiet, "all_reduce": units}]
    for zero2 in ("optim", "optim_grads"):
        assert counts[zero2] == [
            {**quiet, "all_gather": units},
            {**quiet, "reduce_scatter": units},
        ]
    per_micro_batch = units + blocks - 1
    assert counts["optim_grads_params"] == [
        {**quiet, "all_gather": per_micro_batch},
        {**quiet, "all_gather": per_micro_batch, "reduce_scatter": units},
    ]


@pytest.mark.slow
def test_strategies_compose_with_tensor_pipeline_and_expert_parallelism(tmp_path):
    # Four ranks: tp2 x dp2, pp2 x dp2 (interleaved, two micro-batches per rank) and ep2 x edp2,
    # the latter with selective recomputation, which replays the nested expert units' hooks.
    reference = one_process(*FOUR_SEGMENTS, "--micro-batch-size", "2", "--train-iters", "3")
    layouts = {"tp2": TP2, "pp2": PP2, "ep2": [*EP2, "--recompute-granularity", "selective"]}
    cases = {
        f"{name} {strategy}": [
            *FOUR_SEGMENTS,
            "--micro-batch-size",
            "2",
            "--train-iters",
            "3",
            *layout,
            STRATEGY,
            strategy,
        ]
        for name, layout in layouts.items()
        for strategy in ("no_shard", "optim_grads")
    }
    losses, _, _ = run_cases(4, tmp_path, cases)
    for name in cases:
        assert_close(losses[name], reference)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize(
    "layout",
    [
        [STRATEGY, "no_shard"],
        [STRATEGY, "no_shard", *TWO_MICRO_BATCHES, "--expert-model-parallel-size", "2"],
        [STRATEGY, "optim_grads", *TWO_MICRO_BATCHES],
        [DIST_OPT],
    ],
    ids=["no_shard", "no_shard-ep2-accumulation", "optim_grads-accumulation", "distopt"],
)
def test_bf16_strategy_on_two_gpus_tracks_one_gpu(tmp_path, layout):
    from test_distributed import torchrun as train_torchrun

    from megatron_hybrid.training.trainer import run_training

    gpu = ["--device", "cuda", "--bf16"]
    batch = TWO_MICRO_BATCHES if TWO_MICRO_BATCHES[0] in layout else []
    one_gpu = run_training(build_parser().parse_args([*FLAGS, *gpu, *batch])).losses
    losses = train_torchrun(2, *FLAGS, *gpu, *layout, log_dir=tmp_path)
    # As tests/test_gpu_distributed.py: bf16 GEMM inputs (~4e-3 relative) rounded in other
    # places (bf16 parameter copies, fp32 reduction) compound over 6 steps to 2e-2 relative.
    for a, b in zip(losses, one_gpu, strict=True):
        assert a == pytest.approx(b, rel=2e-2)


# -- the worker ----------------------------------------------------------------------------------

COLLECTIVES = {
    "all_gather": "all_gather_single",  # FSDP2's default all-gather calls
    "reduce_scatter": "reduce_scatter_single",
    "all_reduce": "all_reduce",
}


def count_collectives() -> dict[str, list[dict[str, int]]]:
    """Per strategy: the collectives FSDP2 / replicate start in each micro-batch of a step of
    two, through the trainer's `prepare_micro_batch`."""
    import torch.distributed as dist
    from test_tensor_parallel import build_model, fixed_batch

    from megatron_hybrid.parallel.data_parallel import prepare_micro_batch
    from megatron_hybrid.parallel.dims import ParallelDims

    counts: dict[str, list[dict[str, int]]] = {}
    originals = {name: getattr(dist, fn) for name, fn in COLLECTIVES.items()}
    for strategy in SHARDING_STRATEGIES:
        model, config = build_model(FLAGS)
        mesh = ParallelDims(dist.get_world_size()).build_mesh("cpu")
        apply_data_parallel(model, mesh, strategy, bf16=False, log=lambda _: None)
        counts[strategy] = []
        for micro in range(2):
            seen = dict.fromkeys(COLLECTIVES, 0)
            for name, fn in COLLECTIVES.items():
                setattr(dist, fn, _counting(originals[name], seen, name))
            try:
                prepare_micro_batch(model, strategy, last=micro == 1)
                batch = fixed_batch(config.vocab_size)
                model(batch[:, :-1], batch[:, 1:]).backward()
            finally:
                for name, fn in COLLECTIVES.items():
                    setattr(dist, fn, originals[name])
            counts[strategy].append(seen)
    return counts


def _counting(collective, seen: dict[str, int], name: str):
    def counted(*args, **kwargs):
        seen[name] += 1
        return collective(*args, **kwargs)

    return counted


def worker(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from megatron_hybrid.parallel.distributed import end_successful_run
    from megatron_hybrid.training.trainer import run_training

    dist.init_process_group("gloo")
    spec = json.loads(Path(spec_path).read_text())
    result = {"losses": {}}
    for name, flags in spec["cases"].items():
        run = run_training(build_parser().parse_args([*FLAGS, *flags]))
        result["losses"][name] = run.losses
    if spec["collectives"]:
        result["collectives"] = count_collectives()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(result))
    end_successful_run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:4])
