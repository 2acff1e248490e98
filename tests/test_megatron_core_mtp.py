"""Megatron-Core `torch_dist` checkpoints of models with multi-token-prediction (MTP) depths.

In: checkpoints that the independent writer of tests/megatron_core_writer.py spells as a
Megatron-Core hybrid model with '/' parts saves them (each depth's enorm, hnorm, eh_proj and
final_layernorm under `mtp.layers.{d}.`, its layers under `mtp.layers.{d}.mtp_model_layer.
layers.{j}.`), in the TE and local layer specs, at tensor-parallel size 1 and 2, load with the
logits and MTP losses of the model that was written. Out: `to-megatron` writes what the writer
spells, and ours -> to-megatron -> from-megatron -> ours is bitwise. A missing or unknown MTP
tensor, and MTP settings this version does not compute, are named.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import perturb_parameters, small_config
from megatron_core_writer import Variant, write_megatron_checkpoint
from test_megatron_core_checkpoints import (
    assert_holds_what_the_writer_spells,
    assert_round_trip_is_bitwise,
    our_checkpoint,
)

from megatron_hybrid.checkpointing.convert import main as convert
from megatron_hybrid.checkpointing.errors import CheckpointError
from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.checkpointing.megatron_core import read_megatron_state
from megatron_hybrid.checkpointing.megatron_core.directory import open_checkpoint
from megatron_hybrid.checkpointing.state import ModelState
from megatron_hybrid.model import HybridModel

# Megatron-LM's MTP needs rope or no positions; SwiGLU makes linear_fc1 two halves.
OPTIONS = dict(activation="swiglu", position_embedding_type="rope")
# Two depths of Mamba + MLP after a main decoder of all three; one fused depth after a fused
# main decoder (Megatron-Core's pattern drops the groups: "M-*-/M-").
PATTERNS = ["M*-/M-/M-", "[M-]*-/[M-]"]
VARIANTS = [Variant(layer_spec, tp=tp) for tp in (1, 2) for layer_spec in ("te", "local")]
TOKENS = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))


def model_and_state(pattern: str, seed: int = 3, **options):
    config = small_config(pattern, **{**OPTIONS, **options})
    model = perturb_parameters(HybridModel(config, seed=seed), seed=seed)
    return model, ModelState(model, config.pattern).state_dict()


def logits_and_mtp_losses(model: HybridModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The main head's logits and each MTP depth's loss, L_1 .. L_D, for TOKENS."""
    inputs, labels = TOKENS[:, :-1], TOKENS[:, 1:]
    with torch.no_grad():
        hidden = model.hidden_states(inputs)
        losses = model.mtp.depth_losses(hidden, labels, model.embedding, model.output_weight())
        return model(inputs), torch.stack(losses)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_megatron_checkpoint_with_mtp_loads_with_the_same_logits_and_mtp_losses(
    tmp_path, pattern, variant
):
    model, state = model_and_state(pattern)
    write_megatron_checkpoint(tmp_path, state, model.config, variant)
    fresh = HybridModel(model.config, seed=99)  # other weights: the load must replace all
    load_checkpoint(tmp_path, fresh, None, fresh.config)
    loaded = ModelState(fresh, fresh.config.pattern).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state), "a tensor changed on the way"
    # The same float32 weights through the same ops: the same values, bit for bit.
    for ours, theirs in zip(
        logits_and_mtp_losses(fresh), logits_and_mtp_losses(model), strict=True
    ):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_saved_args_carry_the_mtp_depths(tmp_path, pattern):
    model, state = model_and_state(pattern, mtp_loss_scaling_factor=0.3)
    write_megatron_checkpoint(tmp_path, state, model.config, Variant())
    config = read_megatron_state(tmp_path).config  # from Megatron-LM's args alone
    megatron_pattern = pattern.replace("[", "").replace("]", "")
    assert config.hybrid_layer_pattern == megatron_pattern
    assert config.mtp_num_layers == model.config.pattern.mtp_depths
    assert config.pattern.mtp_blocks == tuple(megatron_pattern.split("/")[1])
    assert config.mtp_loss_scaling_factor == 0.3


def test_the_mtp_pattern_older_megatron_lm_runs_kept_apart_is_joined(tmp_path):
    model, state = model_and_state("M*-/M-/M-")
    overrides = {
        "hybrid_layer_pattern": "M*-",
        "mtp_hybrid_override_pattern": "M-",
        "mtp_num_layers": 2,
    }
    write_megatron_checkpoint(tmp_path, state, model.config, Variant(), args_overrides=overrides)
    read = read_megatron_state(tmp_path)
    assert read.config.hybrid_layer_pattern == "M*-/M-/M-"
    assert all(torch.equal(read.model[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "setting, need",
    [
        ("mtp_use_repeated_layer", "MTP depths with layers of their own"),
        ("mtp_hsm", "no hidden-state mixing between MTP depths"),
        ("mtp_detach_heads", "MTP losses that train the main model too"),
    ],
)
def test_mtp_settings_this_version_does_not_compute_are_named(tmp_path, capsys, setting, need):
    model, state = model_and_state("M*-/M-/M-")
    overrides = {setting: True}
    write_megatron_checkpoint(tmp_path, state, model.config, Variant(), args_overrides=overrides)
    assert convert(["from-megatron", str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"{setting}=True (need {need})" in capsys.readouterr().err


# -- bad input -------------------------------------------------------------------------------------
def test_a_missing_mtp_tensor_is_named(tmp_path):
    model, state = model_and_state("M*-/M-/M-")
    del state["mtp.layers.1.eh_proj.weight"]  # as if the checkpoint lacked it
    write_megatron_checkpoint(tmp_path, state, model.config, Variant())
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)
    message = str(error.value)
    assert "1 tensor(s) of the model missing: mtp.layers.1.eh_proj.weight" in message
    assert "nothing was loaded" in message


@pytest.mark.parametrize(
    "unknown",
    [
        "mtp.layers.2.enorm.weight",  # a third depth, where the args say two
        "mtp.layers.0.mtp_model_layer.layers.1.mlp.linear_fc1.bias",  # a bias Megatron can add
        "mtp.layers.0.mtp_model_layer.final_norm.weight",  # MTP's stack has no final norm
    ],
)
def test_an_mtp_tensor_no_depth_saves_is_named(tmp_path, unknown):
    model, state = model_and_state("M*-/M-/M-")
    write_megatron_checkpoint(
        tmp_path, state, model.config, Variant(), extra_tensors={unknown: torch.ones(32)}
    )
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, HybridModel(model.config), None, model.config)
    assert "1 tensor(s) that no layer of pattern 'M*-/M-/M-' saves" in str(error.value)
    assert unknown in str(error.value)


# -- out: to-megatron ------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_spec", ["te", "local"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_to_megatron_writes_the_mtp_depths_and_back_is_bitwise(tmp_path, pattern, layer_spec, tp):
    model = our_checkpoint(tmp_path, pattern, **OPTIONS)
    assert_round_trip_is_bitwise(tmp_path, layer_spec, tp, pattern)
    written = assert_holds_what_the_writer_spells(
        tmp_path / "megatron", model, Variant(layer_spec=layer_spec, tp=tp)
    )
    (common,) = written.read_objects(["common_state/shard_0_1"]).values()
    args = torch.load(io.BytesIO(common), weights_only=False)[0]["args"]
    megatron_pattern = pattern.replace("[", "").replace("]", "")
    assert args.hybrid_layer_pattern == megatron_pattern
    assert args.mtp_num_layers == megatron_pattern.count("/")
    # The main decoder's layers, as Megatron-LM counts them (get_hybrid_total_layer_count).
    assert args.num_layers == len(megatron_pattern.split("/")[0])
    # eh_proj saved as Megatron's column-parallel ranks would: its rows in tp chunks.
    chunks = open_checkpoint(tmp_path / "megatron").tensors["mtp.layers.0.eh_proj.weight"].chunks
    assert [tuple(c.offsets) for c in chunks] == [(32 // tp * r, 0) for r in range(tp)]


def test_to_megatron_checks_the_mtp_depths_fit_the_tensor_parallel_size(tmp_path, capsys):
    # Attention only in the MTP depth: its 4 heads do not split over 8 ranks; nor do the
    # 32 rows of eh_proj over 64.
    our_checkpoint(tmp_path, "M-/*-", **OPTIONS)
    for tp, problem in (
        (8, "num_attention_heads (--num-attention-heads)=4"),
        (64, "hidden_size (rows of MTP's column-parallel eh_proj)=32"),
    ):
        args = ["to-megatron", str(tmp_path / "ours"), str(tmp_path / f"tp{tp}")]
        assert convert([*args, "--tensor-parallel-size", str(tp)]) == 2
        assert problem in capsys.readouterr().err
