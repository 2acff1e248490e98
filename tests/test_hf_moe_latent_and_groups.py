"""Latent MoE and group-limited routing to and from Hugging Face `nemotron_h`
(checkpointing/hf_nemotron_h.py): logits equal transformers' own NemotronHForCausalLM within
1e-5 (float32, CPU; as tests/test_hf_nemotron_h.py) in both directions, the tensors convert
exactly, and group settings whose routing transformers computes differently from Megatron's
rule are refused, never converted into other routing."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402
from test_hf_nemotron_h import (  # noqa: E402
    assert_logits_close,
    canonical_state,
    hf_config,
    load_canonical,
    perturb,
    random_hf_model,
    tokens,
)

from megatron_hybrid.checkpointing.hf_nemotron_h import (  # noqa: E402
    HFExportError,
    HFImportError,
    canonical_to_hf,
    group_routing_problem,
    hf_config_from_model_config,
    hf_to_canonical,
    load_hf_checkpoint,
    model_config_from_hf_config,
    save_hf_checkpoint,
)
from megatron_hybrid.layers.moe import TopKRouter  # noqa: E402
from megatron_hybrid.model import HybridModel  # noqa: E402

NemotronHConfig = transformers.NemotronHConfig
NemotronHForCausalLM = transformers.NemotronHForCausalLM
NemotronHTopkRouter = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHTopkRouter

# 8 experts in 4 groups of 2, top 4 from the best 2 groups: topk // group_topk = 2, where
# Megatron's and transformers' group scores agree.
OUR_GROUPS = dict(
    num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2
)
HF_GROUPS = dict(n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2)
OUR_CASES = {
    "latent": dict(moe_latent_size=12),
    "groups": OUR_GROUPS,
    "latent_and_groups": dict(moe_latent_size=12, **OUR_GROUPS),
}
HF_CASES = {
    "latent": dict(moe_latent_size=12),
    "groups": HF_GROUPS,
    "latent_and_groups": dict(moe_latent_size=12, **HF_GROUPS),
}


def without_groups(model: HybridModel) -> None:
    for layer in model.moe_layers():
        layer.router.num_groups = layer.router.group_topk = None


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, case):
    config = hf_config("M-[*E]M-E", untie_embeddings_and_output_weights=True, **OUR_CASES[case])
    model = HybridModel(config, seed=3).eval()
    perturb(model, seed=4)
    save_hf_checkpoint(tmp_path, canonical_state(model), config)

    hf_model, info = NemotronHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    hf_config_loaded = hf_model.config
    assert hf_config_loaded.moe_latent_size == config.moe_latent_size
    assert (hf_config_loaded.n_group, hf_config_loaded.topk_group) == (
        (4, 2) if config.moe_router_num_groups else (1, 1)
    )
    ids = tokens(config.vocab_size)
    with torch.no_grad():
        ours = model(ids)
        assert_logits_close(ours, hf_model.eval()(ids, use_cache=False).logits)
        if config.moe_router_num_groups:  # the groups decide some tokens' experts here
            without_groups(model)
            assert (model(ids) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("case", list(HF_CASES))
def test_import_of_transformers_save_pretrained_gives_the_same_logits(tmp_path, case):
    hf_model = random_hf_model(
        ["linear_attention", "moe", "full_attention", "moe", "mlp"], **HF_CASES[case]
    )
    hf_model.save_pretrained(tmp_path)

    state, config = load_hf_checkpoint(tmp_path, hybrid_layer_pattern="[ME]*E-")
    assert config.moe_latent_size == hf_model.config.moe_latent_size
    expected_groups = (4, 2) if "n_group" in HF_CASES[case] else (None, None)
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == expected_groups
    model = HybridModel(config).eval()
    load_canonical(model, state)
    ids = tokens(config.vocab_size, seed=1)
    with torch.no_grad():
        ours = model(ids)
        assert_logits_close(ours, hf_model(ids, use_cache=False).logits)
        if config.moe_router_num_groups:
            without_groups(model)
            assert (model(ids) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_canonical_to_hf_to_canonical_is_exact(case):
    config = hf_config("[*E]E", **OUR_CASES[case])
    model = HybridModel(config)
    perturb(model, seed=7)
    state = canonical_state(model)
    hf_state = canonical_to_hf(state, config)
    if config.moe_latent_size:
        assert torch.equal(
            hf_state["backbone.layers.1.mixer.fc1_latent_proj.weight"],
            state["decoder.layers.1.mlp.fc1_latent_proj.weight"],
        )
        assert hf_state["backbone.layers.2.mixer.fc2_latent_proj.weight"].shape == (32, 12)
        assert hf_state["backbone.layers.2.mixer.experts.3.up_proj.weight"].shape == (16, 12)
    back = hf_to_canonical(hf_state, config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "groups", [(4, 2), (4, 4), (2, 2)], ids=["restricted", "all_four_kept", "all_two_kept"]
)
def test_config_round_trip(groups):
    num_groups, group_topk = groups
    config = hf_config(
        "M[*E]",
        num_moe_experts=8,
        moe_router_topk=4,
        moe_router_num_groups=num_groups,
        moe_router_group_topk=group_topk,
        moe_latent_size=12,
    )
    hf = hf_config_from_model_config(config)
    restricted = group_topk < num_groups
    # Every group kept is HF's no-group setting (its group step needs 2 experts per group).
    assert (hf["n_group"], hf["topk_group"]) == (groups if restricted else (1, 1))
    assert hf["moe_latent_size"] == 12
    assert model_config_from_hf_config(hf).to_dict() == config.to_dict()
    bare = model_config_from_hf_config({k: v for k, v in hf.items() if k != "megatron_hybrid"})
    assert (bare.moe_router_num_groups, bare.moe_router_group_topk) == (
        groups if restricted else (None, None)
    )
    assert bare.moe_latent_size == 12


# -- the two group rules --------------------------------------------------------------------------
# (experts, topk, groups, groups kept per token): agreeing settings (topk // kept = 2, or every
# group kept), then disagreeing ones (topk // kept = 1 and 3).
AGREE = [(8, 4, 4, 2), (8, 2, 4, 1), (16, 5, 4, 2), (8, 2, 4, 4)]
DISAGREE = [(8, 2, 4, 2), (8, 3, 2, 1), (16, 6, 4, 2)]


def hf_and_our_routers(experts, topk, groups, kept):
    hf_router = NemotronHTopkRouter(
        NemotronHConfig(
            hidden_size=32,
            n_routed_experts=experts,
            num_experts_per_tok=topk,
            n_group=groups,
            topk_group=kept,
            layers_block_type=["moe"],
        )
    )
    ours = TopKRouter(
        hf_config(
            "E",
            num_moe_experts=experts,
            moe_router_topk=topk,
            moe_router_num_groups=groups,
            moe_router_group_topk=kept,
            moe_router_topk_scaling_factor=None,  # HF's routed_scaling_factor default, 1
        )
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(experts, 32, generator=generator))
        ours.expert_bias.copy_(0.3 * torch.randn(experts, generator=generator))
        hf_router.weight.copy_(ours.weight)
        hf_router.e_score_correction_bias.copy_(ours.expert_bias)
    return hf_router, ours


@pytest.mark.parametrize("setting", AGREE + DISAGREE, ids=str)
def test_transformers_routes_as_megatron_exactly_where_the_converter_says(setting):
    hf_router, ours = hf_and_our_routers(*setting)
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hf_weights, hf_indices = hf_router(x)
        weights, indices = ours.eval()(x)[:2]
    same = torch.equal(hf_indices.sort(-1).values, indices.sort(-1).values)
    experts, topk, groups, kept = setting
    assert same == (group_routing_problem(topk, groups, kept) is None)
    if same:
        order_hf, order_ours = hf_indices.argsort(-1), indices.argsort(-1)
        torch.testing.assert_close(
            hf_weights.gather(-1, order_hf), weights.gather(-1, order_ours), rtol=1e-6, atol=0
        )


def test_export_of_group_routing_transformers_computes_otherwise_is_refused():
    config = hf_config(
        "ME", num_moe_experts=8, moe_router_topk=2, moe_router_num_groups=4, moe_router_group_topk=2
    )
    with pytest.raises(HFExportError) as error:
        hf_config_from_model_config(config)
    message = str(error.value)
    assert "moe_router_num_groups=4, moe_router_group_topk=2 with moe_router_topk=2" in message
    assert "top 2 expert scores" in message and "topk // group_topk = 1" in message


def test_import_of_group_routing_megatron_computes_otherwise_is_refused(tmp_path):
    hf_model = random_hf_model(
        ["moe"], n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2
    )
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(HFImportError) as error:
        load_hf_checkpoint(tmp_path)
    message = str(error.value)
    assert "n_group=4, topk_group=2 with num_experts_per_tok=2" in message
    assert "topk // group_topk = 1" in message and "valid: topk // group_topk = 2" in message
