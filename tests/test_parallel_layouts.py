"""Every parallel layout trains the same model as one process (torchrun, gloo, CPU, float32).

The pattern has fused groups and all four implemented mixers, cut into four pipeline segments:
pp2 gives each rank two virtual stages (interleaved 1F1B), the two-segment variant one stage each
(1F1B). One process ignores the cuts, so every layout is compared with the same reference run.

Tolerance rtol 1e-5 over 6 iterations: the layouts compute the same float32 math, reduced in
other orders (tensor-parallel partial sums, FSDP reduce-scatter, pipeline micro-batches whose
gradients are summed then divided), which moves a loss by a few float32 ulps (~1e-7) per step;
Adam's normalized updates keep that from growing past ~1e-6 within 6 steps.
"""

from __future__ import annotations

import pytest
import torch
from test_distributed import FLAGS, assert_close, one_process, torchrun, val_losses

from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser, model_config_from_args
from megatron_hybrid.training.trainer import run_training

FOUR_SEGMENTS = ["--hybrid-layer-pattern", "[M-][*E]|M*|E[M-]|*E"]
TWO_SEGMENTS = ["--hybrid-layer-pattern", "[M-][*E]M*|E[M-]*E"]
PP2 = ["--pipeline-model-parallel-size", "2"]
TP2 = ["--tensor-model-parallel-size", "2"]
EP2 = ["--expert-model-parallel-size", "2"]

pytestmark = pytest.mark.slow


# Validation after iterations 3 and 6 on eval_iters x global batch samples, under every layout.
EVAL = ["--eval-iters", "2", "--eval-interval", "3"]


@pytest.fixture(scope="module")
def reference_run():
    """The one-process run (the same for both cuts: one process ignores '|'); evaluating does
    not change training."""
    result = run_training(build_parser().parse_args([*FLAGS, *FOUR_SEGMENTS, *EVAL]))
    assert sorted(result.val_losses) == [3, 6]
    return result


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run.losses


@pytest.fixture(scope="module")
def reference_val_losses(reference_run):
    return reference_run.val_losses


@pytest.mark.parametrize(
    "nproc,pattern,layout",
    [
        (2, FOUR_SEGMENTS, []),  # dp2 (FSDP2)
        (2, FOUR_SEGMENTS, TP2),
        (2, TWO_SEGMENTS, PP2),  # one stage per rank, 1F1B
        (2, FOUR_SEGMENTS, PP2),  # two virtual stages per rank, interleaved 1F1B
        (2, FOUR_SEGMENTS, [*PP2, "--pipeline-schedule", "interleaved-zero-bubble"]),
        # Full recompute re-runs forward in backward, also in torch's shape-inference pass.
        (2, FOUR_SEGMENTS, [*PP2, "--recompute-granularity", "full"]),
        (2, FOUR_SEGMENTS, EP2),
        (4, FOUR_SEGMENTS, [*TP2, *PP2]),
    ],
    ids=[
        "dp2",
        "tp2",
        "pp2",
        "pp2-interleaved",
        "pp2-zero-bubble",
        "pp2-full-recompute",
        "ep2",
        "tp2xpp2",
    ],
)
def test_layout_matches_one_process(
    tmp_path, reference, reference_val_losses, nproc, pattern, layout
):
    assert_close(torchrun(nproc, *FLAGS, *pattern, *layout, *EVAL, log_dir=tmp_path), reference)
    validation = val_losses(tmp_path)
    assert validation.keys() == reference_val_losses.keys()
    assert_close(list(validation.values()), list(reference_val_losses.values()))


def test_pipeline_without_cuts_splits_by_blocks(tmp_path, reference):
    pattern = ["--hybrid-layer-pattern", "[M-][*E]M*E[M-]*E"]
    assert_close(torchrun(2, *FLAGS, *pattern, *PP2, log_dir=tmp_path), reference)


def _logits(checkpoint, flags) -> torch.Tensor:
    args = build_parser().parse_args([*FLAGS, *flags])
    config = model_config_from_args(args, 257)
    model = HybridModel(config, seed=999)  # other initial weights: the load must overwrite all
    load_checkpoint(checkpoint, model, None, config)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens)


def test_checkpoints_move_from_tp2_x_pp2_to_one_process_to_dp2(tmp_path, reference):
    # tp2 x pp2 saves at iteration 3: the weights are those of the one-process run at 3. Three
    # Adam steps turn float32 reduction-order noise into weight differences of up to ~1e-6
    # (Adam's m / sqrt(v) is O(1) even for gradients that are pure noise), so the logits (O(1))
    # agree to ~1e-5 absolute (measured 1.5e-5 worst of 18432); a mis-mapped shard would be
    # off by O(1).
    torchrun(
        4,
        *FLAGS,
        *FOUR_SEGMENTS,
        *TP2,
        *PP2,
        "--save",
        str(tmp_path / "a"),
        "--exit-interval",
        "3",
        log_dir=tmp_path / "log_a",
    )
    one_process(*FOUR_SEGMENTS, "--save", str(tmp_path / "ref"), "--exit-interval", "3")
    torch.testing.assert_close(
        _logits(tmp_path / "a", FOUR_SEGMENTS),
        _logits(tmp_path / "ref", FOUR_SEGMENTS),
        rtol=1e-4,
        atol=1e-4,
    )
    # One process (unfused, uncut pattern) resumes it for one iteration and saves ...
    unfused = ["--hybrid-layer-pattern", "M-*E|M*|EM-|*E"]
    resumed = one_process(
        *unfused,
        "--load",
        str(tmp_path / "a"),
        "--save",
        str(tmp_path / "b"),
        "--exit-interval",
        "4",
    )
    assert_close(resumed, reference[3:4])
    # ... and dp2 finishes the run like the straight one.
    dp2 = torchrun(
        2, *FLAGS, *FOUR_SEGMENTS, "--load", str(tmp_path / "b"), log_dir=tmp_path / "log_b"
    )
    assert_close(dp2, reference[4:])


def test_pipeline_size_that_does_not_fit_the_pattern_is_refused():
    from megatron_hybrid.parallel.dims import ParallelConfigError, ParallelDims

    args = build_parser().parse_args([*FLAGS, "--hybrid-layer-pattern", "M*|M-|E*"])
    config = model_config_from_args(args, 257)
    with pytest.raises(ParallelConfigError, match="3 '\\|' segments.*does not divide"):
        ParallelDims(2, pp=2).check_fits(config)
    args = build_parser().parse_args([*FLAGS, *FOUR_SEGMENTS])
    config = model_config_from_args(args, 257)
    with pytest.raises(ParallelConfigError, match="1f1b runs one stage per rank"):
        ParallelDims(2, pp=2, pipeline_schedule="1f1b").check_fits(config)
