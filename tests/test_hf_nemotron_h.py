"""Hugging Face `nemotron_h` export/import (checkpointing/hf_nemotron_h.py): logits match
transformers' own model, conversions are exact inverses, unsupported settings fail clearly."""

from __future__ import annotations

import json
import math

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402
from conftest import small_config  # noqa: E402

from megatron_hybrid.canonical import canonical_key, physical_name  # noqa: E402
from megatron_hybrid.checkpointing import hf_nemotron_h  # noqa: E402
from megatron_hybrid.checkpointing.hf_nemotron_h import (  # noqa: E402
    NO_DT_FLOOR,
    HFExportError,
    HFImportError,
    canonical_shapes,
    canonical_to_hf,
    hf_config_from_model_config,
    hf_to_canonical,
    load_hf_checkpoint,
    model_config_from_hf_config,
    save_hf_checkpoint,
)
from megatron_hybrid.checkpointing.manager import config_differences  # noqa: E402
from megatron_hybrid.layers.mamba2 import Mamba2Mixer  # noqa: E402
from megatron_hybrid.model import HybridModel  # noqa: E402
from megatron_hybrid.training.arguments import build_parser, model_config_from_args  # noqa: E402

NemotronHConfig = transformers.NemotronHConfig
NemotronHForCausalLM = transformers.NemotronHForCausalLM

# Settings HF's nemotron_h can express: sigmoid router with scaling, shared expert, relu2, no rope.
HF_COMPATIBLE = dict(
    hidden_size=32,
    vocab_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=8,
    mamba_num_heads=8,
    moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=24,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_topk_scaling_factor=2.5,
)


def hf_config(pattern: str, **overrides):
    return small_config(pattern, **{**HF_COMPATIBLE, **overrides})


def canonical_state(model: HybridModel) -> dict[str, torch.Tensor]:
    pattern = model.config.pattern
    return {canonical_key(n, pattern): t for n, t in model.state_dict().items()}


def load_canonical(model: HybridModel, state: dict[str, torch.Tensor]) -> None:
    pattern = model.config.pattern
    model.load_state_dict({physical_name(k, pattern): v for k, v in state.items()}, strict=True)


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every float tensor (norm weights, D, expert biases included) off its init value."""
    gen = torch.Generator().manual_seed(seed)
    for tensor in module.state_dict().values():
        if tensor.is_floating_point():
            tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.1)


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 1e-2  # a meaningful comparison, not of near-zero logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


EXPORT_CASES = [
    ("M-*E", {}),  # untied
    ("[M-][*E]M-", {"untie_embeddings_and_output_weights": False}),  # tied, fused
    (
        "ME[*-]|M*E",
        {
            "moe_router_topk": 1,
            "moe_router_enable_expert_bias": False,
            "moe_router_topk_scaling_factor": None,
        },
    ),
]


@pytest.mark.parametrize("pattern,overrides", EXPORT_CASES)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, pattern, overrides):
    config = hf_config(pattern, **{"untie_embeddings_and_output_weights": True, **overrides})
    model = HybridModel(config, seed=3).eval()
    perturb(model, seed=4)
    save_hf_checkpoint(tmp_path, canonical_state(model), config)

    hf_model, info = NemotronHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    ids = tokens(config.vocab_size)
    with torch.no_grad():
        assert_logits_close(model(ids), hf_model.eval()(ids, use_cache=False).logits)


def test_export_in_bfloat16_keeps_the_expert_bias_in_float32(tmp_path):
    config = hf_config("M*E")
    model = HybridModel(config)
    save_hf_checkpoint(tmp_path, canonical_state(model), config, dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes.pop("backbone.layers.2.mixer.gate.e_score_correction_bias") == "F32"
    assert set(dtypes.values()) == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_export_loads_in_transformers_and_reads_back_exactly(tmp_path):
    config = hf_config("M-*E", untie_embeddings_and_output_weights=False)
    model = HybridModel(config)
    perturb(model, seed=5)
    state = canonical_state(model)
    save_hf_checkpoint(tmp_path, state, config, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2

    _, info = NemotronHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    loaded, loaded_config = load_hf_checkpoint(tmp_path)
    assert loaded_config.to_dict() == config.to_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    # Saving unsharded into the same directory removes the stale shards and index.
    save_hf_checkpoint(tmp_path, state, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def random_hf_model(layer_types, **overrides) -> NemotronHForCausalLM:
    fields = dict(
        vocab_size=80,
        hidden_size=32,
        layers_block_type=layer_types,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=40,
        ssm_state_size=8,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24,
        routed_scaling_factor=1.7,
        time_step_min=NO_DT_FLOOR,
        layer_norm_epsilon=1e-5,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(**fields))
    perturb(model, seed=6)
    return model.eval()


@pytest.mark.parametrize("layout", [None, "[M-][*E]M"])
def test_import_of_transformers_save_pretrained_gives_the_same_logits(tmp_path, layout):
    hf_model = random_hf_model(
        ["linear_attention", "mlp", "full_attention", "moe", "linear_attention"]
    )
    hf_model.save_pretrained(tmp_path)

    state, config = load_hf_checkpoint(tmp_path, hybrid_layer_pattern=layout)
    assert config.hybrid_layer_pattern == (layout or "M-*EM")
    assert config.untie_embeddings_and_output_weights and config.moe_router_enable_expert_bias
    model = HybridModel(config).eval()
    load_canonical(model, state)
    ids = tokens(config.vocab_size, seed=1)
    with torch.no_grad():
        assert_logits_close(model(ids), hf_model(ids, use_cache=False).logits)


def test_import_of_a_config_without_conv_bias_uses_zero_biases(tmp_path):
    hf_model = random_hf_model(["linear_attention", "mlp"], use_conv_bias=False)
    hf_model.save_pretrained(tmp_path)
    state, config = load_hf_checkpoint(tmp_path)
    assert torch.equal(state["decoder.layers.0.mixer.conv1d.bias"], torch.zeros(96))
    model = HybridModel(config).eval()
    load_canonical(model, state)
    ids = tokens(config.vocab_size, seed=2)
    with torch.no_grad():
        assert_logits_close(model(ids), hf_model(ids, use_cache=False).logits)


@pytest.mark.parametrize(
    "pattern,overrides",
    [
        ("[M-][*E]M-", {}),
        ("M*E-", {"untie_embeddings_and_output_weights": True}),
        ("EE", {"moe_router_enable_expert_bias": False}),
    ],
)
def test_canonical_to_hf_to_canonical_is_exact(pattern, overrides):
    config = hf_config(pattern, **overrides)
    model = HybridModel(config)
    perturb(model, seed=7)
    state = canonical_state(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == canonical_shapes(config)
    hf_state = canonical_to_hf(state, config)
    assert all(k.startswith(("backbone.", "lm_head.")) for k in hf_state)
    back = hf_to_canonical(hf_state, config)
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


def test_qkv_rows_are_regrouped_per_query_group():
    config = hf_config("*", num_attention_heads=4, num_query_groups=2, kv_channels=1, hidden_size=4)
    state = canonical_state(HybridModel(config))
    # Rows of group g: q heads (2g, 2g+1), then k_g, then v_g; tag each row with its name.
    names = ["q0", "q1", "k0", "v0", "q2", "q3", "k1", "v1"]
    tags = {n: float(i) for i, n in enumerate(names)}
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.tensor(
        [[tags[n]] * 4 for n in names]
    )
    hf_state = canonical_to_hf(state, config)
    rows = {p: hf_state[f"backbone.layers.0.mixer.{p}_proj.weight"][:, 0].tolist() for p in "qkv"}
    assert rows == {
        "q": [tags[n] for n in ("q0", "q1", "q2", "q3")],
        "k": [tags["k0"], tags["k1"]],
        "v": [tags["v0"], tags["v1"]],
    }


def test_config_round_trip_and_hf_fields():
    config = hf_config("[M-]|[*E]M-", untie_embeddings_and_output_weights=False)
    hf = hf_config_from_model_config(config)
    assert hf["model_type"] == "nemotron_h" and hf["architectures"] == ["NemotronHForCausalLM"]
    assert hf["layers_block_type"] == [
        "linear_attention",
        "mlp",
        "full_attention",
        "moe",
        "linear_attention",
        "mlp",
    ]
    assert hf["time_step_min"] == NO_DT_FLOOR and hf["tie_word_embeddings"] is False
    assert hf["time_step_limit"] == [0.0, math.inf]  # no clamp, as Megatron
    assert (hf["num_key_value_heads"], hf["head_dim"], hf["routed_scaling_factor"]) == (2, 8, 2.5)
    assert model_config_from_hf_config(hf).to_dict() == config.to_dict()
    # Without our record, HF's fields alone give the unfused, untied equivalent.
    bare = {k: v for k, v in hf.items() if k != "megatron_hybrid"}
    imported = model_config_from_hf_config(bare)
    assert imported.hybrid_layer_pattern == "M-*EM-"
    assert imported.untie_embeddings_and_output_weights
    # transformers accepts the dict as is.
    hf_cfg = NemotronHConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    assert hf_cfg.layers_block_type == hf["layers_block_type"]


def test_unsupported_export_settings_are_all_named():
    config = small_config(
        "M*-EG/M*",
        position_embedding_type="rope",
        activation="swiglu",
        moe_router_score_function="softmax",
        num_moe_experts=1,
        moe_router_topk=1,
    )
    with pytest.raises(HFExportError) as err:
        hf_config_from_model_config(config)
    message = str(err.value)
    for expected in (
        "'G' (Gated DeltaNet)",
        "position_embedding_type",
        "'none'",
        "activation='swiglu'",
        "'squared_relu'",
        "moe_router_score_function='softmax'",
        "'sigmoid'",
        "moe_shared_expert_intermediate_size=None",
        "num_moe_experts=1",
    ):
        assert expected in message, expected
    assert isinstance(err.value, ValueError)


def test_state_that_does_not_fit_the_config_names_the_keys():
    config = hf_config("M*")
    state = canonical_state(HybridModel(config))
    del state["decoder.layers.0.mixer.D"]
    state["decoder.layers.1.self_attention.linear_qkv.weight"] = torch.zeros(3, 32)
    with pytest.raises(HFExportError, match=r"missing \(1\): decoder.layers.0.mixer.D") as err:
        canonical_to_hf(state, config)
    assert "linear_qkv.weight has (3, 32), expected (64, 32)" in str(err.value)


def test_unsupported_hf_settings_on_import_are_all_named():
    hf = hf_config_from_model_config(hf_config("M-*E"))
    hf.pop("megatron_hybrid")
    hf.update(
        mamba_hidden_act="gelu",
        mlp_hidden_act="silu",
        n_group=4,  # with top-2 of 4 experts: groups ranked by their best, not their top 2
        topk_group=2,
        sliding_window=16,
        use_bias=True,
        norm_topk_prob=False,
    )
    with pytest.raises(HFImportError) as err:
        model_config_from_hf_config(hf)
    for field in (
        "mamba_hidden_act='gelu'",
        "mlp_hidden_act='silu'",
        "n_group=4, topk_group=2",
        "sliding_window=16",
        "use_bias=True",
        "norm_topk_prob=False",
    ):
        assert field in str(err.value), field
    with pytest.raises(HFImportError, match="model_type='llama'"):
        model_config_from_hf_config({**hf, "model_type": "llama"})


# -- Mamba's dt clamp: transformers 5.15-5.24 apply time_step_min, 5.25 time_step_limit --------
def hf_applied_dt_limit(hf_model: NemotronHForCausalLM) -> tuple[float, float]:
    """The dt clamp the installed transformers applies: its mixers' time_step_limit, which
    5.15-5.24 set to (time_step_min, inf) and 5.25 to config.time_step_limit. A low end below
    NO_DT_FLOOR reads as 0 (no floor), as the converter reads it."""
    limits = {
        tuple(layer.mixer.time_step_limit)
        for layer in hf_model.model.layers
        if hasattr(layer.mixer, "time_step_limit")
    }
    assert len(limits) == 1, limits
    low, high = limits.pop()
    return (low if low > NO_DT_FLOOR else 0.0, high)


def installed_hf_applies_time_step_limit() -> bool:
    model = random_hf_model(["linear_attention"], time_step_min=0.001, time_step_limit=(0.05, 0.5))
    return hf_applied_dt_limit(model) == (0.05, 0.5)


def mamba_mixers(model: HybridModel) -> list[Mamba2Mixer]:
    return [m for m in model.modules() if isinstance(m, Mamba2Mixer)]


@torch.no_grad()
def spread_dt_bias(dt_biases) -> None:
    """dt_bias from -12 (softplus ~ 6e-6, below every floor used here) to 3 (~3, above every
    ceiling), so that a clamp at either end decides part of the output."""
    for dt_bias in dt_biases:
        dt_bias.copy_(torch.linspace(-12.0, 3.0, dt_bias.numel()))


def logits_with_dt_limit(model: HybridModel, ids: torch.Tensor, dt_limit) -> torch.Tensor:
    """Our logits with every Mamba layer clamping dt to `dt_limit` instead of its config's."""
    mixers = mamba_mixers(model)
    kept = [m.dt_limit for m in mixers]
    for m in mixers:
        m.dt_limit = dt_limit
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        for m, limit in zip(mixers, kept, strict=True):
            m.dt_limit = limit


# A clamp that decides the output moves logits by far more than the 1e-5 parity tolerance.
CLAMP_MATTERS = 10 * 1e-5


def test_hf_dt_floor_is_imported_as_our_dt_clamp(tmp_path):
    """HF's default time_step_limit (0, inf) with time_step_min=0.001: transformers 5.15-5.24
    clamp dt >= 0.001, 5.25 does not clamp. The import computes what the installed one does.
    dt_bias = -12 puts softplus far below 0.001, where the two readings differ."""
    hf_model = random_hf_model(["linear_attention", "mlp"], time_step_min=0.001)
    with torch.no_grad():
        hf_model.model.layers[0].mixer.dt_bias.fill_(-12.0)
    hf_model.save_pretrained(tmp_path)
    state, config = load_hf_checkpoint(tmp_path)
    assert config.mamba_dt_limit == hf_applied_dt_limit(hf_model)
    model = HybridModel(config).eval()
    load_canonical(model, state)
    ids = tokens(config.vocab_size, seed=3)
    with torch.no_grad():
        expected = hf_model(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
    floored = logits_with_dt_limit(model, ids, (0.001, math.inf))
    unclamped = logits_with_dt_limit(model, ids, (0.0, math.inf))
    assert (floored - unclamped).abs().max() > CLAMP_MATTERS  # the two readings differ here


@pytest.mark.parametrize("time_step_limit", [(0.05, math.inf), (0.0, 0.5), (0.02, 0.8)])
def test_import_of_a_time_step_limit_gives_the_same_logits(tmp_path, time_step_limit):
    hf_model = random_hf_model(
        ["linear_attention", "mlp", "linear_attention"],
        time_step_min=0.001,
        time_step_limit=time_step_limit,
    )
    spread_dt_bias(
        layer.mixer.dt_bias for layer in hf_model.model.layers if hasattr(layer.mixer, "dt_bias")
    )
    hf_model.save_pretrained(tmp_path)
    state, config = load_hf_checkpoint(tmp_path)
    assert config.mamba_dt_limit == hf_applied_dt_limit(hf_model)
    model = HybridModel(config).eval()
    load_canonical(model, state)
    ids = tokens(config.vocab_size, seed=4)
    with torch.no_grad():
        expected = hf_model(ids, use_cache=False).logits
        assert_logits_close(model(ids), expected)
    unclamped = logits_with_dt_limit(model, ids, (0.0, math.inf))
    assert (unclamped - expected).abs().max() > CLAMP_MATTERS


@pytest.mark.parametrize("floor,ceiling", [(0.05, None), (0.0, 0.5), (0.05, 0.5)])
def test_export_of_a_dt_clamp_gives_the_same_logits_in_transformers(tmp_path, floor, ceiling):
    config = hf_config(
        "M-*EM",
        mamba_dt_floor=floor,
        mamba_dt_ceiling=ceiling,
        untie_embeddings_and_output_weights=True,
    )
    model = HybridModel(config, seed=3).eval()
    perturb(model, seed=4)
    spread_dt_bias(m.dt_bias for m in mamba_mixers(model))
    if ceiling is not None and not installed_hf_applies_time_step_limit():
        with pytest.raises(HFExportError, match=f"mamba_dt_ceiling={ceiling}"):
            save_hf_checkpoint(tmp_path, canonical_state(model), config)
        return
    save_hf_checkpoint(tmp_path, canonical_state(model), config)

    hf_model, info = NemotronHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    assert hf_applied_dt_limit(hf_model) == config.mamba_dt_limit
    ids = tokens(config.vocab_size, seed=5)
    with torch.no_grad():
        ours = model(ids)
        assert_logits_close(ours, hf_model.eval()(ids, use_cache=False).logits)
    unclamped = logits_with_dt_limit(model, ids, (0.0, math.inf))
    assert (unclamped - ours).abs().max() > CLAMP_MATTERS


def test_dt_clamp_is_written_in_both_hf_fields_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_nemotron_h, "installed_transformers_version", lambda: "5.25.0")
    config = hf_config("M-", mamba_dt_floor=0.05, mamba_dt_ceiling=0.5)
    hf = hf_config_from_model_config(config)
    assert (hf["time_step_min"], hf["time_step_limit"]) == (0.05, [0.05, 0.5])
    assert model_config_from_hf_config(hf).to_dict() == config.to_dict()
    bare = {k: v for k, v in hf.items() if k != "megatron_hybrid"}
    assert model_config_from_hf_config(bare).mamba_dt_limit == (0.05, 0.5)

    # An infinite ceiling goes to config.json as transformers writes it: strict JSON.
    floor_only = hf_config("M-", mamba_dt_floor=0.05)
    save_hf_checkpoint(tmp_path, canonical_state(HybridModel(floor_only)), floor_only)

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    written = json.loads((tmp_path / "config.json").read_text(), parse_constant=reject)
    assert written["time_step_limit"] == [0.05, {"__float__": "Infinity"}]
    assert written["time_step_min"] == 0.05
    _, loaded = load_hf_checkpoint(tmp_path)
    assert loaded.to_dict() == floor_only.to_dict()


def bare_hf_config(**fields) -> dict:
    hf = hf_config_from_model_config(hf_config("M-"))
    hf.pop("megatron_hybrid")
    return {**hf, **fields}


@pytest.mark.parametrize(
    "version,clamp",
    [
        ("5.15.1", (0.001, None)),
        ("5.24.0", (0.001, None)),  # Zamba2's (time_step_min, inf)
        ("5.5.0", (0.05, 0.5)),
        ("5.10.2", (0.05, 0.5)),
        ("5.25.0", (0.05, 0.5)),
        ("5.26.0.dev0", (0.05, 0.5)),  # later: the newest known behaviour
        (None, (0.05, 0.5)),  # transformers not installed: likewise
    ],
)
def test_import_reads_the_dt_clamp_that_the_transformers_version_applies(
    monkeypatch, version, clamp
):
    monkeypatch.setattr(hf_nemotron_h, "installed_transformers_version", lambda: version)
    config = model_config_from_hf_config(
        bare_hf_config(time_step_min=0.001, time_step_limit=[0.05, 0.5])
    )
    assert (config.mamba_dt_floor, config.mamba_dt_ceiling) == clamp


@pytest.mark.parametrize("version", ["5.12.0", "4.57.1"])
def test_disagreeing_dt_fields_under_a_transformers_of_unknown_behaviour_fail(monkeypatch, version):
    monkeypatch.setattr(hf_nemotron_h, "installed_transformers_version", lambda: version)
    with pytest.raises(HFImportError, match=f"installed transformers {version} applies is not"):
        model_config_from_hf_config(
            bare_hf_config(time_step_min=0.001, time_step_limit=[0.0, math.inf])
        )
    # Fields that agree read alike in every version.
    agreed = model_config_from_hf_config(
        bare_hf_config(time_step_min=0.05, time_step_limit=[0.05, math.inf])
    )
    assert agreed.mamba_dt_limit == (0.05, math.inf)


@pytest.mark.parametrize("version", ["5.24.0", "5.12.0"])
def test_export_of_a_dt_ceiling_that_the_transformers_would_ignore_fails(monkeypatch, version):
    monkeypatch.setattr(hf_nemotron_h, "installed_transformers_version", lambda: version)
    with pytest.raises(
        HFExportError,
        match=rf"mamba_dt_ceiling=0.5: the installed transformers "
        rf"{version}.*valid: no ceiling",
    ):
        hf_config_from_model_config(hf_config("M-", mamba_dt_ceiling=0.5))
    floor_only = hf_config_from_model_config(hf_config("M-", mamba_dt_floor=0.05))
    assert (floor_only["time_step_min"], floor_only["time_step_limit"]) == (0.05, [0.05, math.inf])


@pytest.mark.parametrize("limit", [[0.5, 0.1], [0.0], "0,inf", [0.0, math.nan]])
def test_malformed_time_step_limit_is_named(limit):
    with pytest.raises(HFImportError, match=r"time_step_limit=.*expected \[low, high\]"):
        model_config_from_hf_config(bare_hf_config(time_step_limit=limit))


def test_training_flags_keep_an_imported_dt_clamp():
    """`--load` of an import warns about config fields the flags set differently and trains
    with the flags' config: --mamba-dt-floor / --mamba-dt-ceiling keep the imported clamp."""
    imported = model_config_from_hf_config(
        bare_hf_config(time_step_min=0.05, time_step_limit=[0.05, 0.5])
    )
    base = ["--hybrid-layer-pattern", "M-"]
    with_flags = model_config_from_args(
        build_parser().parse_args([*base, "--mamba-dt-floor", "0.05", "--mamba-dt-ceiling", "0.5"]),
        64,
    )
    assert with_flags.mamba_dt_limit == imported.mamba_dt_limit == (0.05, 0.5)
    without = config_differences(
        imported.to_dict(), model_config_from_args(build_parser().parse_args(base), 64)
    )
    assert "mamba_dt_floor: checkpoint 0.05, now 0.0" in without
    assert "mamba_dt_ceiling: checkpoint 0.5, now None" in without
    # (mamba_dt_min, dt_bias's init range from HF's time_step_min, differs: no flag, no math.)
    assert not [
        line
        for line in config_differences(imported.to_dict(), with_flags)
        if line.startswith(("mamba_dt_floor", "mamba_dt_ceiling"))
    ]


def test_tied_import_requires_lm_head_equal_to_the_embedding():
    config = hf_config("M-")
    hf_state = canonical_to_hf(canonical_state(HybridModel(config)), config)
    hf_state["lm_head.weight"] = hf_state["lm_head.weight"] + 1
    with pytest.raises(HFImportError, match="lm_head.weight differs"):
        hf_to_canonical(hf_state, config)


def test_recorded_tying_yields_to_a_separately_trained_lm_head(tmp_path):
    config = hf_config("M-", untie_embeddings_and_output_weights=False)
    save_hf_checkpoint(tmp_path / "ours", canonical_state(HybridModel(config)), config)
    hf_model = NemotronHForCausalLM.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        hf_model.lm_head.weight.add_(1.0)  # e.g. fine-tuned in transformers
    hf_model.save_pretrained(tmp_path / "tuned")
    with pytest.warns(UserWarning, match="untie_embeddings_and_output_weights"):
        state, loaded = load_hf_checkpoint(tmp_path / "tuned")
    assert loaded.untie_embeddings_and_output_weights
    assert torch.equal(state["output_layer.weight"], hf_model.lm_head.weight)


def test_legacy_field_names_are_understood():
    hf = hf_config_from_model_config(hf_config("M-*"))
    for field in ("layers_block_type", "megatron_hybrid", "num_hidden_layers"):
        hf.pop(field)
    hf["mamba_n_groups"] = hf.pop("n_groups")
    hf["mamba_chunk_size"] = hf.pop("chunk_size")
    hf["mamba_dt_min"] = hf.pop("time_step_min")
    hf["mamba_dt_limit"] = [0.0, 0.5]
    hf.pop("time_step_limit")
    config = model_config_from_hf_config(hf)
    assert config.hybrid_layer_pattern == "M-*"
    assert config.mamba_dt_ceiling == 0.5  # from mamba_dt_limit (5.25 reads time_step_limit)
    assert (config.mamba_num_groups, config.mamba_chunk_size) == (2, 8)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(HFImportError, match="config.json: file not found"):
        load_hf_checkpoint(tmp_path)
    config = hf_config("M-")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model_config(config)))
    with pytest.raises(HFImportError, match="no model.safetensors or model.safetensors.index"):
        load_hf_checkpoint(tmp_path)


def test_the_default_models_refusal_names_the_flags_that_make_it_exportable():
    # The embedded default run (no flags) trains a model nemotron_h cannot hold; the refusal
    # must say which training flags would have made it exportable.
    config = model_config_from_args(build_parser().parse_args([]), 257)
    problems = hf_nemotron_h.export_problems(config)
    assert problems
    message = "\n".join(problems)
    for problem in problems:
        assert "(flag: --" in problem, problem
    if "E" in config.hybrid_layer_pattern:
        assert "--moe-router-score-function sigmoid" in message
        assert "--moe-shared-expert-intermediate-size N" in message
    if config.position_embedding_type != "none":
        assert "--position-embedding-type none" in message


def test_exported_files_have_the_same_mode_as_config_json(tmp_path):
    config = hf_config("M*E")
    save_hf_checkpoint(tmp_path, canonical_state(HybridModel(config)), config)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
