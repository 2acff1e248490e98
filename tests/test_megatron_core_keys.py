"""The Megatron-Core key tables in the mixer specs (MixerSpec.megatron_core) are complete, and
the pieces of the converter that stand alone: the stand-in unpickler, the args mapping."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pickle

import pytest
import torch
from conftest import small_config

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.checkpointing.key_mapping import PlacedKeyMap, to_ours, to_theirs
from megatron_hybrid.checkpointing.megatron_core import keys
from megatron_hybrid.checkpointing.megatron_core.args import (
    MIXER_ARG_NAMES,
    OUR_CONFIG_ARG,
    args_from_model_config,
    model_config_from_args,
)
from megatron_hybrid.checkpointing.megatron_core.load import LR_SCHEDULE_ARGS
from megatron_hybrid.checkpointing.megatron_core.unpickling import StandIn, load_pickle
from megatron_hybrid.config import ConfigError
from megatron_hybrid.model import HybridModel
from megatron_hybrid.specs import SPECS
from megatron_hybrid.specs.base import MEGATRON_LAYER_SPECS
from megatron_hybrid.training.optimizer import LRSchedule

# Every optional tensor switched on (the latent projections with moe_latent_size).
ALL_OPTIONS = dict(
    moe_shared_expert_intermediate_size=16, moe_router_enable_expert_bias=True, moe_latent_size=16
)
# For MLA's symbols: the query latent and the latent norms (instead of linear_q_proj, which
# NO_QUERY_LATENT gives).
MLA_OPTIONS = dict(q_lora_rank=16, qk_layernorm=True)
NO_QUERY_LATENT = dict(q_lora_rank=None, qk_layernorm=False)
SYMBOLS = sorted(s for s in SPECS if SPECS[s].megatron_core is not None)


def layer_tensors(symbol: str, **options) -> dict[str, torch.Tensor]:
    """Random values of every tensor of a one-layer model of `symbol`, relative to the layer."""
    mla = MLA_OPTIONS if symbol in "+D" else {}
    config = small_config(symbol, **{**ALL_OPTIONS, **mla, **options})
    generator = torch.Generator().manual_seed(0)
    return {
        k.removeprefix("decoder.layers.0."): torch.randn(t.shape, generator=generator)
        for k, t in (
            (canonical_key(n, config.pattern), t)
            for n, t in HybridModel(config).state_dict().items()
        )
        if k.startswith("decoder.layers.0.")
    }, config


def test_every_implemented_symbol_has_a_megatron_core_layout():
    assert set(SYMBOLS) == set(SPECS)


@pytest.mark.parametrize("layer_spec", MEGATRON_LAYER_SPECS)
@pytest.mark.parametrize("symbol", SYMBOLS)
@pytest.mark.parametrize(
    "options",
    [{}, {"activation": "swiglu"}, {"moe_latent_size": 16}, NO_QUERY_LATENT],
    ids=["relu2", "swiglu", "latent", "no_query_latent"],
)
def test_each_layer_spec_maps_every_tensor_once_and_round_trips(symbol, layer_spec, options):
    state, config = layer_tensors(symbol, **options)
    layout = SPECS[symbol].megatron_core
    maps = [PlacedKeyMap.place(m, config) for m in layout.key_maps[layer_spec]]
    maps = [m for m in maps if m.ours[0] in state]  # optional tensors the config lacks
    assert all(len(m.ours) == 1 for m in maps)
    ours = [m.ours[0] for m in maps]
    theirs = [k for m in maps for k in m.theirs]
    assert sorted(ours) == sorted(state) and len(set(theirs)) == len(theirs)
    back = to_ours(to_theirs(state, maps, config), maps, config)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_the_other_spellings_round_trip(symbol):
    state, config = layer_tensors(symbol)
    for key_map in SPECS[symbol].megatron_core.read_also:
        placed = PlacedKeyMap.place(key_map, config)
        (key,) = placed.ours
        back = to_ours(to_theirs(state, [placed], config), [placed], config)
        assert torch.equal(back[key], state[key])


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_extra_states_belong_to_tensors_of_the_layer(symbol):
    state = {**layer_tensors(symbol)[0], **layer_tensors(symbol, **NO_QUERY_LATENT)[0]}
    for layer_spec in MEGATRON_LAYER_SPECS:
        for extra in SPECS[symbol].megatron_core.extra_state[layer_spec]:
            assert extra.of in state, (layer_spec, extra)


def test_mamba_parts_are_saved_under_megatron_core_suffixes():
    config = small_config("M")
    maps = keys.write_maps(config, "te")
    names = {k for m in maps for k in m.theirs if ".mixer." in k or "layer_norm" in k}
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in names
    assert {
        f"decoder.layers.0.mixer.in_proj.weight.{p}" for p in ("z", "x", "B", "C", "dt")
    } <= names
    assert {f"decoder.layers.0.mixer.conv1d.bias.{p}" for p in ("x", "B", "C")} <= names


def test_a_symbol_without_a_layout_is_refused_by_name(monkeypatch):
    without = dataclasses.replace(SPECS["M"], megatron_core=None)
    monkeypatch.setattr(keys, "SPECS", {**SPECS, "M": without})
    with pytest.raises(keys.MegatronLayoutError, match="'M'.*MixerSpec.megatron_core"):
        keys.write_maps(small_config("M-"), "te")


def test_lr_schedule_arguments_name_every_schedule_field():
    assert set(LR_SCHEDULE_ARGS) == {f.name for f in dataclasses.fields(LRSchedule)}


# -- args ------------------------------------------------------------------------------------------
def test_args_written_for_a_config_read_back_to_it():
    config = small_config("[M-]|*E", activation="swiglu", position_embedding_type="rope")
    args = args_from_model_config(
        config, iteration=1, consumed_train_samples=0, tensor_parallel=2, pipeline_parallel=1
    )
    assert args.hybrid_layer_pattern == "M-|*E"  # Megatron's pattern: no fusion groups
    assert model_config_from_args(args, config.vocab_size, "ckpt") == config


def test_mla_and_dsa_args_are_read_only_for_a_pattern_with_their_layers():
    config = small_config(
        "[+E]M[D-]", q_lora_rank=16, qk_layernorm=True, rope_type="rope", dsa_indexer_topk=4
    )
    args = args_from_model_config(
        config, iteration=1, consumed_train_samples=0, tensor_parallel=1, pipeline_parallel=1
    )
    assert args.multi_latent_attention and args.experimental_attention_variant == "dsa"
    assert not args.group_query_attention  # Megatron-LM refuses it with MLA
    delattr(args, OUR_CONFIG_ARG)  # Megatron-LM's args alone
    read = model_config_from_args(args, config.vocab_size, "ckpt")
    assert {f: getattr(read, f) for f in MIXER_ARG_NAMES} == {
        f: getattr(config, f) for f in MIXER_ARG_NAMES
    }
    # Megatron-LM's args hold its MLA defaults for any model; a model without MLA ignores them.
    args.hybrid_layer_pattern, args.qk_layernorm = "M-", False
    assert model_config_from_args(args, config.vocab_size, "ckpt").kv_lora_rank is None


def test_qk_layernorm_without_a_query_latent_is_refused_naming_the_flags():
    with pytest.raises(keys.MegatronLayoutError) as error:
        keys.write_maps(small_config("+M[D-]", qk_layernorm=True), "te")
    message = str(error.value)
    assert "'+':" in message and "'D':" in message and "--q-lora-rank" in message


def test_our_recorded_config_is_not_used_for_other_layers():
    config = small_config("[M-]*E")
    args = args_from_model_config(
        config, iteration=1, consumed_train_samples=0, tensor_parallel=1, pipeline_parallel=1
    )
    args.hybrid_layer_pattern = "M-*EM-"  # the run went on with more layers in Megatron-LM
    assert model_config_from_args(args, config.vocab_size, "ckpt").hybrid_layer_pattern == "M-*EM-"


def test_args_a_model_here_cannot_compute_are_each_named():
    config = small_config("M-")
    args = args_from_model_config(
        config, iteration=1, consumed_train_samples=0, tensor_parallel=1, pipeline_parallel=1
    )
    args.add_bias_linear, args.qk_layernorm, args.position_embedding_type = True, True, "yarn"
    with pytest.raises(ConfigError) as error:
        model_config_from_args(args, config.vocab_size, "iter_0000001")
    message = str(error.value)
    assert message.startswith("iter_0000001")
    for name in ("add_bias_linear=True", "qk_layernorm=True", "position_embedding_type='yarn'"):
        assert name in message


# -- the stand-in unpickler ------------------------------------------------------------------------
def test_unknown_globals_become_inert_stand_ins(tmp_path):
    witness = tmp_path / "ran"
    # A pickle that calls os.system when unpickled by pickle.load.
    payload = b"cos\nsystem\n(S'touch " + str(witness).encode() + b"'\ntR."
    value = load_pickle(payload)
    assert isinstance(value, StandIn) and value.stand_in_name == "os.system"
    assert not witness.exists()


def test_torch_constants_and_containers_are_real():
    value = {
        "dtype": torch.float32,
        "size": torch.Size([2, 3]),
        "args": argparse.Namespace(lr=0.1, layers=[1, 2]),
        "ordered": collections.OrderedDict(a=1),
    }
    loaded = load_pickle(pickle.dumps(value))
    assert loaded == value and loaded["dtype"] is torch.float32


@pytest.mark.parametrize(
    "name,value",
    [
        ("rotary_interleaved", True),
        ("window_size", (128, 0)),
        ("moe_expert_capacity_factor", 1.0),
        ("experimental_attention_variant", "gdn2"),
        ("softmax_type", "learnable"),
    ],
)
def test_megatron_options_that_change_the_math_are_refused(name, value):
    config = small_config("M*E")
    args = args_from_model_config(
        config, iteration=1, consumed_train_samples=0, tensor_parallel=1, pipeline_parallel=1
    )
    setattr(args, name, value)
    with pytest.raises(ConfigError, match=f"{name}="):
        model_config_from_args(args, config.vocab_size, "ckpt")
