"""HybridModel: structure, canonical initialization, fused == unfused, unsupported symbols."""

from __future__ import annotations

import torch
from conftest import perturb_parameters, small_config

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.model import HybridModel

FUSED, UNFUSED = "[M-][*E]M-", "M-*EM-"


def canonical_state(model: HybridModel) -> dict[str, torch.Tensor]:
    return {canonical_key(k, model.config.pattern): v for k, v in model.state_dict().items()}


def test_one_module_per_physical_block_named_by_global_index():
    model = HybridModel(small_config("M[*-]|[ME]-"))
    assert list(model.decoder.layers.keys()) == ["0", "1", "2", "3"]
    assert [b.block for b in model.decoder.layers.values()] == ["M", "*-", "ME", "-"]
    fused = model.decoder.layers["1"]
    assert hasattr(fused, "sequence_mixer") and hasattr(fused, "channel_mixer")
    assert not hasattr(model.decoder.layers["0"], "channel_mixer")
    assert not hasattr(model.decoder.layers["3"], "sequence_mixer")


def test_forward_gives_logits_over_the_vocabulary():
    model = HybridModel(small_config(FUSED))
    logits = model(torch.randint(0, 64, (2, 13)))
    assert logits.shape == (2, 13, 64)
    assert torch.isfinite(logits).all()


def test_tied_model_has_no_output_layer_and_untied_has_one():
    tied = HybridModel(small_config("M-"))
    untied = HybridModel(small_config("M-", untie_embeddings_and_output_weights=True))
    assert tied.output_layer is None and "output_layer.weight" not in tied.state_dict()
    assert untied.state_dict()["output_layer.weight"].shape == (64, 32)


def test_fused_and_unfused_models_have_identical_canonical_parameters():
    fused = canonical_state(HybridModel(small_config(FUSED), seed=7))
    unfused = canonical_state(HybridModel(small_config(UNFUSED), seed=7))
    assert fused.keys() == unfused.keys()
    for key in fused:
        assert torch.equal(fused[key], unfused[key]), key


def test_fused_and_unfused_models_give_identical_logits():
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (3, 21))
    # Off the initial values, where every norm weight is one: a fused block scaling by the wrong
    # norm's weight would go unnoticed there.
    fused = perturb_parameters(HybridModel(small_config(FUSED), seed=7), seed=3)(tokens)
    unfused = perturb_parameters(HybridModel(small_config(UNFUSED), seed=7), seed=3)(tokens)
    # Fusion regroups modules; every op and its operands are the same: bitwise equal in float32.
    assert torch.equal(fused, unfused)


def test_initialization_depends_on_seed():
    a = canonical_state(HybridModel(small_config(UNFUSED), seed=1))
    b = canonical_state(HybridModel(small_config(UNFUSED), seed=2))
    key = "decoder.layers.0.mixer.in_proj.weight"
    assert not torch.equal(a[key], b[key])


def test_initialization_of_a_key_does_not_depend_on_the_rest_of_the_model():
    # Layer 0 of "M-" and of "M-*E" is the same canonical tensor: same initial value.
    short = canonical_state(HybridModel(small_config("M-*E"), seed=3))
    longer = canonical_state(HybridModel(small_config("M-*EM"), seed=3))
    assert torch.equal(
        short["decoder.layers.2.self_attention.linear_qkv.weight"],
        longer["decoder.layers.2.self_attention.linear_qkv.weight"],
    )


def test_initial_values_follow_the_documented_rules():
    config = small_config("M-", init_method_std=0.02)
    state = canonical_state(HybridModel(config, seed=0))
    assert torch.equal(state["decoder.layers.0.norm.weight"], torch.ones(32))
    assert torch.equal(state["decoder.layers.0.mixer.D"], torch.ones(config.mamba_num_heads))
    a = -torch.exp(state["decoder.layers.0.mixer.A_log"])
    assert ((a <= -1.0) & (a >= -16.0)).all()
    dt = torch.nn.functional.softplus(state["decoder.layers.0.mixer.dt_bias"])
    assert ((dt >= config.mamba_dt_init_floor - 1e-7) & (dt <= config.mamba_dt_max + 1e-6)).all()
    embed = state["embedding.word_embeddings.weight"]
    assert abs(embed.std().item() - 0.02) < 0.003
    fc2 = state["decoder.layers.1.mlp.linear_fc2.weight"]
    assert abs(fc2.std().item() - 0.02 / (2 * 2) ** 0.5) < 0.002  # scaled by 1/sqrt(2 * layers)


def test_every_mixer_runs_forward_and_backward_under_bf16_autocast():
    # The CPU stand-in for `--bf16` on CUDA: GEMMs in bf16, residual stream in float32.
    model = HybridModel(small_config("[M-][*E]M-E", moe_shared_expert_intermediate_size=16))
    tokens = torch.randint(0, 64, (2, 19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
