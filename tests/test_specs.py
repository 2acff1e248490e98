"""Every implemented pattern symbol has a complete spec (megatron_hybrid/specs/): each part is
present and covers every tensor of the module the spec builds."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from conftest import small_config

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.checkpointing.key_mapping import PlacedKeyMap, to_ours, to_theirs
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.init import MissingInitRuleError, init_rule
from megatron_hybrid.kernels.registry import eager_kernels
from megatron_hybrid.model import HybridModel
from megatron_hybrid.pattern import CHANNEL_MIXERS, SEQUENCE_MIXERS, SYMBOL_NAMES
from megatron_hybrid.specs import IMPLEMENTED_SYMBOLS, SPECS
from megatron_hybrid.specs.base import (
    CHANNEL,
    SEQUENCE,
    ColumnParallel,
    RowParallel,
    SplitElsewhere,
    SplitRows,
)

# Every optional part switched on, so that every tensor a mixer can have exists.
ALL_OPTIONS = dict(
    moe_shared_expert_intermediate_size=16, moe_router_enable_expert_bias=True, moe_latent_size=12
)
# Optional parts that exclude each other, one config each (MLA's and DSA's query: from a latent,
# or not).
MLA_QUERIES = (dict(q_lora_rank=8, qk_layernorm=True), dict())
EXCLUSIVE_OPTIONS = {"+": MLA_QUERIES, "D": MLA_QUERIES}
SYMBOLS = sorted(SPECS)


def config_of(symbol: str, **overrides) -> ModelConfig:
    return small_config(symbol, **{**ALL_OPTIONS, **overrides})


def configs_of(symbol: str) -> list[ModelConfig]:
    """One config per set of exclusive options (just `config_of(symbol)` for most symbols)."""
    return [config_of(symbol, **options) for options in EXCLUSIVE_OPTIONS.get(symbol, ({},))]


def tensors_over_options(symbol: str) -> set[str]:
    """Every tensor the mixer has under some config."""
    return set().union(*(tensor_names(built_mixer(symbol, c)) for c in configs_of(symbol)))


def built_mixer(symbol: str, config: ModelConfig | None = None) -> torch.nn.Module:
    return SPECS[symbol].build(config or config_of(symbol), eager_kernels())


def tensor_names(module: torch.nn.Module) -> set[str]:
    """Parameters and persistent buffers: what a checkpoint holds."""
    return set(module.state_dict())


def test_the_registry_is_the_set_of_implemented_symbols():
    assert IMPLEMENTED_SYMBOLS == set(SPECS) == set("M*-EG+D")
    assert all(spec.symbol == symbol for symbol, spec in SPECS.items())
    assert set(SPECS) == set(SYMBOL_NAMES)  # every symbol of the pattern language builds


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_every_required_part_is_present(symbol):
    spec = SPECS[symbol]
    for field in dataclasses.fields(spec):
        if field.name != "hf_nemotron_h":  # optional: a format may lack the layer
            value = getattr(spec, field.name)
            assert value is not None and value != () and value != {}, field.name
    for part in ("build", "check_config", "forward_flops_per_token", "parameter_count"):
        assert callable(getattr(spec, part)), part
    assert spec.kind == (SEQUENCE if symbol in SEQUENCE_MIXERS else CHANNEL)
    assert symbol in SEQUENCE_MIXERS | CHANNEL_MIXERS


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_config_fields_are_fields_of_the_model_config(symbol):
    known = {f.name for f in dataclasses.fields(ModelConfig)} | {
        name for name, value in vars(ModelConfig).items() if isinstance(value, property)
    }
    unknown = set(SPECS[symbol].config_fields) - known
    assert not unknown, f"{symbol!r} reads fields ModelConfig lacks: {unknown}"


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_every_tensor_of_the_mixer_has_exactly_one_init_rule(symbol):
    rules = set(SPECS[symbol].init_rules)
    names = tensors_over_options(symbol)
    assert names - rules == set(), f"{symbol!r}: tensors without an init rule"
    assert rules - names == set(), f"{symbol!r}: init rules for tensors the mixer lacks"


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_a_tensor_named_like_another_mixers_gets_no_rule_from_it(symbol):
    # Were a mixer to grow a tensor named like another's (Mamba's A_log, an MLP's linear_fc1),
    # it would not inherit that mixer's rule: lookups go through the symbol's own spec.
    config = config_of(symbol)
    spec = SPECS[symbol]
    foreign = {name for other in SPECS.values() for name in other.init_rules} - set(spec.init_rules)
    assert foreign
    for name in foreign:
        with pytest.raises(MissingInitRuleError, match=re.escape(f"init_rules of the {symbol!r}")):
            init_rule(f"decoder.layers.0.{spec.slots.mixer}.{name}", config)


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_every_parameter_has_a_tensor_parallel_entry(symbol):
    plan = SPECS[symbol].tensor_parallel
    mixers = [built_mixer(symbol, config) for config in configs_of(symbol)]
    parameters = {name for mixer in mixers for name, _ in mixer.named_parameters()}
    assert parameters - set(plan.parameters) == set(), f"{symbol!r}: parameters without a plan"
    assert set(plan.parameters) - parameters == set(), f"{symbol!r}: plan for missing params"
    for mixer in mixers:
        present = {name for name, _ in mixer.named_parameters()}
        for name, style in plan.parameters.items():
            if name not in present:
                continue
            if isinstance(style, (ColumnParallel, RowParallel)):
                assert isinstance(mixer.get_submodule(name.rpartition(".")[0]), torch.nn.Linear)
            if isinstance(style, (ColumnParallel, SplitRows)) and style.parts is not None:
                parts = style.parts(mixer)
                assert parts is None or sum(parts) == mixer.get_parameter(name).shape[0], name
            if isinstance(style, SplitElsewhere):
                assert style.where
        for name in plan.activations:  # identity markers the plan hooks
            assert isinstance(mixer.get_submodule(name), torch.nn.Identity), name
    for field, flag in plan.divisible:
        assert isinstance(getattr(config_of(symbol), field), int) and flag.startswith("--")


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_parameter_count_and_flops_formulas_fit_the_built_mixer(symbol):
    spec = SPECS[symbol]
    for config in configs_of(symbol):
        built = sum(p.numel() for p in built_mixer(symbol, config).parameters())
        assert spec.parameter_count(config) == built
        flops = spec.forward_flops_per_token(config, 16)
        assert math.isfinite(flops) and flops > 0


@pytest.mark.parametrize("symbol", SYMBOLS)
def test_canonical_keys_are_the_spec_slots(symbol):
    slots = SPECS[symbol].slots
    for config in configs_of(symbol):
        keys = {canonical_key(name, config.pattern) for name in HybridModel(config).state_dict()}
        layer = {
            k.removeprefix("decoder.layers.0.") for k in keys if k.startswith("decoder.layers.")
        }
        assert layer == {f"{slots.norm}.weight"} | {
            f"{slots.mixer}.{name}" for name in tensor_names(built_mixer(symbol, config))
        }


@pytest.mark.parametrize("symbol", [s for s in SYMBOLS if SPECS[s].hf_nemotron_h is not None])
def test_hf_key_table_covers_every_tensor_and_round_trips(symbol):
    spec = SPECS[symbol]
    config = config_of(symbol, moe_router_score_function="sigmoid")
    maps = [PlacedKeyMap.place(m, config) for m in spec.hf_nemotron_h.key_maps]
    ours = [k for m in maps for k in m.ours]
    theirs = [k for m in maps for k in m.theirs]
    assert len(set(ours)) == len(ours) and len(set(theirs)) == len(theirs)
    assert set(ours) == {f"{spec.slots.norm}.weight"} | {
        f"{spec.slots.mixer}.{name}" for name in tensor_names(built_mixer(symbol, config))
    }
    generator = torch.Generator().manual_seed(0)
    model = HybridModel(config)
    state = {
        k.removeprefix("decoder.layers.0."): torch.randn(t.shape, generator=generator)
        for k, t in ((canonical_key(n, config.pattern), t) for n, t in model.state_dict().items())
        if k.startswith("decoder.layers.0.")
    }
    back = to_ours(to_theirs(state, maps, config), maps, config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
