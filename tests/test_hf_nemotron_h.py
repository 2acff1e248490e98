"""Hugging Face `nemotron_h` export/import (checkpointing/hf_nemotron_h.py): logits match
transformers' own model, conversions are exact inverses, unsupported settings fail clearly."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402
from conftest import small_config  # noqa: E402

from megatron_hybrid.checkpointing.canonical import canonical_key, physical_name  # noqa: E402
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
from megatron_hybrid.model import HybridModel  # noqa: E402

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
    ("ME[*-]|M*E", {"moe_router_topk": 1, "moe_router_enable_expert_bias": False,
                    "moe_router_topk_scaling_factor": None}),
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
        vocab_size=80, hidden_size=32, layers_block_type=layer_types,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=40,
        ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, conv_kernel=4,
        chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, routed_scaling_factor=1.7,
        time_step_min=NO_DT_FLOOR, layer_norm_epsilon=1e-5,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(**fields))
    perturb(model, seed=6)
    return model.eval()


@pytest.mark.parametrize("layout", [None, "[M-][*E]M"])
def test_import_of_transformers_save_pretrained_gives_the_same_logits(tmp_path, layout):
    hf_model = random_hf_model(["linear_attention", "mlp", "full_attention", "moe",
                                "linear_attention"])
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


@pytest.mark.parametrize("pattern,overrides", [
    ("[M-][*E]M-", {}),
    ("M*E-", {"untie_embeddings_and_output_weights": True}),
    ("EE", {"moe_router_enable_expert_bias": False}),
])
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
    config = hf_config("*", num_attention_heads=4, num_query_groups=2, kv_channels=1,
                       hidden_size=4)
    state = canonical_state(HybridModel(config))
    # Rows of group g: q heads (2g, 2g+1), then k_g, then v_g; tag each row with its name.
    names = ["q0", "q1", "k0", "v0", "q2", "q3", "k1", "v1"]
    tags = {n: float(i) for i, n in enumerate(names)}
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.tensor(
        [[tags[n]] * 4 for n in names])
    hf_state = canonical_to_hf(state, config)
    rows = {p: hf_state[f"backbone.layers.0.mixer.{p}_proj.weight"][:, 0].tolist()
            for p in "qkv"}
    assert rows == {"q": [tags[n] for n in ("q0", "q1", "q2", "q3")],
                    "k": [tags["k0"], tags["k1"]], "v": [tags["v0"], tags["v1"]]}


def test_config_round_trip_and_hf_fields():
    config = hf_config("[M-]|[*E]M-", untie_embeddings_and_output_weights=False)
    hf = hf_config_from_model_config(config)
    assert hf["model_type"] == "nemotron_h" and hf["architectures"] == ["NemotronHForCausalLM"]
    assert hf["layers_block_type"] == ["linear_attention", "mlp", "full_attention", "moe",
                                       "linear_attention", "mlp"]
    assert hf["time_step_min"] == NO_DT_FLOOR and hf["tie_word_embeddings"] is False
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
        "M*-EG/M*", position_embedding_type="rope", activation="swiglu",
        moe_router_score_function="softmax", num_moe_experts=1, moe_router_topk=1)
    with pytest.raises(HFExportError) as err:
        hf_config_from_model_config(config)
    message = str(err.value)
    for expected in ("'G' (Gated DeltaNet)", "multi-token-prediction", "position_embedding_type",
                     "'none'", "activation='swiglu'", "'squared_relu'",
                     "moe_router_score_function='softmax'", "'sigmoid'",
                     "moe_shared_expert_intermediate_size=None", "num_moe_experts=1"):
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
    hf.update(mamba_hidden_act="gelu", mlp_hidden_act="silu", moe_latent_size=8, n_group=2,
              topk_group=1, sliding_window=16, use_bias=True, norm_topk_prob=False)
    with pytest.raises(HFImportError) as err:
        model_config_from_hf_config(hf)
    for field in ("mamba_hidden_act='gelu'", "mlp_hidden_act='silu'", "moe_latent_size=8",
                  "n_group=2", "sliding_window=16", "use_bias=True", "norm_topk_prob=False"):
        assert field in str(err.value), field
    with pytest.raises(HFImportError, match="model_type='llama'"):
        model_config_from_hf_config({**hf, "model_type": "llama"})


def test_hf_dt_floor_is_imported_as_our_dt_clamp(tmp_path):
    """HF clamps dt >= time_step_min; the import sets mamba_dt_floor so our forward clamps too.
    dt_bias = -12 puts softplus far below the floor, where the clamp decides the output."""
    hf_model = random_hf_model(["linear_attention", "mlp"], time_step_min=0.001)
    with torch.no_grad():
        hf_model.model.layers[0].mixer.dt_bias.fill_(-12.0)
    hf_model.save_pretrained(tmp_path)
    state, config = load_hf_checkpoint(tmp_path)
    assert config.mamba_dt_floor == 0.001
    model = HybridModel(config).eval()
    load_canonical(model, state)
    ids = tokens(config.vocab_size, seed=3)
    with torch.no_grad():
        expected = hf_model(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
        model.decoder.layers["0"].self_attention.dt_limit = (0.0, float("inf"))  # no clamp
        assert (model(ids) - expected).abs().max() > 10 * 1e-5  # so the clamp matters here


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
    config = model_config_from_hf_config(hf)
    assert config.hybrid_layer_pattern == "M-*"
    assert (config.mamba_num_groups, config.mamba_chunk_size) == (2, 8)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(HFImportError, match="config.json: file not found"):
        load_hf_checkpoint(tmp_path)
    config = hf_config("M-")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model_config(config)))
    with pytest.raises(HFImportError, match="no model.safetensors or model.safetensors.index"):
        load_hf_checkpoint(tmp_path)
