"""Multi-token prediction under pipeline, tensor (with sequence) and data parallelism (torchrun,
gloo, CPU, float32): each layout trains as one process does, the MTP losses included.

MTP runs on the last pipeline stage, which then holds its copy of the embedding (also untied,
for the shifted tokens); its blocks are split by tensor parallelism and sharded by FSDP like the
decoder's. Tolerance rtol 1e-5 over 6 iterations, as tests/test_parallel_layouts.py explains:
the same float32 math reduced in other orders."""

from __future__ import annotations

import json
from pathlib import Path

import launch
import pytest
from test_distributed import FLAGS, assert_close

from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.trainer import run_training

pytestmark = pytest.mark.slow

# Two pipeline segments (one process ignores the cut), two MTP depths of a fused block and an
# attention layer; MoE in the main decoder with expert bias (FLAGS).
MTP = ["--hybrid-layer-pattern", "[M-][*E]|M*E/[M-]*/[M-]*"]
UNTIED = ["--untie-embeddings-and-output-weights"]


def metrics(log_dir: Path) -> tuple[list[float], list[float]]:
    """(loss, mtp_loss) of every logged iteration."""
    records = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    return [r["loss"] for r in train], [r["mtp_loss"] for r in train]


def one_process(tmp_path: Path, *flags: str) -> tuple[list[float], list[float]]:
    log_dir = tmp_path / "one"
    run_training(build_parser().parse_args([*FLAGS, *flags, "--log-dir", str(log_dir)]))
    return metrics(log_dir)


def torchrun(tmp_path: Path, *flags: str) -> tuple[list[float], list[float], str]:
    """(loss, mtp_loss, rank 0's output) of a run on two ranks."""
    log_dir = tmp_path / "torchrun"
    run = launch.torchrun(2, launch.TRAIN_SCRIPT, *FLAGS, *flags, "--log-dir", str(log_dir))
    return (*metrics(log_dir), run.stdout)


@pytest.mark.parametrize(
    "layout,model,wrapped",
    [
        # MTP on the last stage, whose copy of the (untied) embedding gets the MTP gradient.
        (["--pipeline-model-parallel-size", "2"], UNTIED, "pipeline: 2 stages over 2 ranks"),
        # The MTP depths' blocks are split too: 2 + 2 x 1 Mamba2, 2 + 2 x 1 attention and
        # 1 + 2 x 1 MLP sub-layers (MoE goes to expert parallelism).
        (
            ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
            [],
            "tensor parallel over 2 ranks: 4 Mamba2, 4 attention, 3 MLP layers",
        ),
        ([], [], "FSDP2: 9 blocks + root"),  # 5 blocks in the decoder, 2 in each depth
    ],
    ids=["pp2-untied", "tp2-sequence-parallel", "dp2"],
)
def test_layout_trains_mtp_as_one_process(tmp_path, layout, model, wrapped):
    losses, mtp_losses, output = torchrun(tmp_path, *MTP, *model, *layout)
    assert wrapped in output
    reference_losses, reference_mtp = one_process(tmp_path, *MTP, *model)
    assert_close(losses, reference_losses)
    assert_close(mtp_losses, reference_mtp)
