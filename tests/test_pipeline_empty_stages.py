"""Empty pipeline segments ("||M*", Megatron-Core's way of balancing a pipeline): an empty stage
holds only what Megatron puts there: the embedding on the first stage, the final norm and the
output layer (with the loss) on the last, nothing in the middle; and a pipeline with such stages
trains the model one process trains."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config
from test_distributed import FLAGS, assert_close, one_process, torchrun

from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.pipeline import rank_stage_specs, stage_blocks
from megatron_hybrid.training.arguments import build_parser, model_config_from_args


def parts_of_rank(config, pp: int, rank: int) -> dict[int, HybridModel]:
    indices, specs = rank_stage_specs(config, pp, rank)
    return {i: HybridModel(config, stage=s) for i, s in zip(indices, specs, strict=True)}


def parameter_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def test_empty_stages_hold_the_embedding_the_loss_or_nothing():
    config = small_config("|M*||M-||", untie_embeddings_and_output_weights=True)
    assert stage_blocks(config.pattern, 2) == [(), (0, 1), (), (2, 3), (), ()]
    rank0, rank1 = parts_of_rank(config, 2, 0), parts_of_rank(config, 2, 1)
    assert parameter_names(rank0[0]) == {"embedding.word_embeddings.weight"}  # first, empty
    assert parameter_names(rank0[2]) == parameter_names(rank0[4]) == set()  # middle, empty
    assert parameter_names(rank1[5]) == {"decoder.final_norm.weight", "output_layer.weight"}
    hidden = torch.randn(2, 5, config.hidden_size)
    assert torch.equal(rank0[2](hidden), hidden)  # a middle empty stage passes its input on


def test_an_empty_last_stage_of_tied_embeddings_keeps_its_copy_for_the_output():
    config = small_config("M*|")
    last = parts_of_rank(config, 2, 1)[1]
    assert parameter_names(last) == {
        "decoder.final_norm.weight",
        "embedding.word_embeddings.weight",
    }
    assert last.holds_embedding_copy


@pytest.mark.slow
def test_pipeline_with_empty_stages_trains_as_one_process(tmp_path):
    # Rank 0 holds stages 0, 2, 4: the embedding and two empty middle stages; rank 1 holds the
    # layers and the empty last stage (final norm, output, loss). Same model as FLAGS' pattern.
    pattern = ["--hybrid-layer-pattern", "|[M-][*E]||M*E||"]
    save = ["--save", str(tmp_path / "ckpt")]
    losses = torchrun(
        2, *FLAGS, *pattern, "--pipeline-model-parallel-size", "2", *save, log_dir=tmp_path
    )
    # Tolerance as in tests/test_parallel_layouts.py: the same float32 math, micro-batch
    # gradients summed in another order, a few ulps per step.
    assert_close(losses, one_process())
    # Its checkpoint holds every tensor: it loads (the key check passes) into one process.
    config = model_config_from_args(build_parser().parse_args([*FLAGS, *pattern]), 257)
    load_checkpoint(tmp_path / "ckpt", HybridModel(config, seed=5), None, config)
