"""Latent MoE and group-limited routing (megatron_hybrid/layers/moe.py) against a float64
token-by-token reference written from Megatron-Core's definitions, plus their config checks,
flags, initialization, parameter counts and FLOPs.

Megatron-Core (transformer/moe/moe_utils.py, `topk_routing_with_score_function` and
`group_limited_topk`; moe_layer.py for the latent projections):
- experts are chosen by the sigmoid scores plus the expert bias (sigmoid), by the logits
  (softmax), or by the softmax probabilities (softmax with --moe-router-pre-softmax); ours also
  allows the expert bias with softmax, choosing by probabilities plus bias;
- group-limited: the E experts form G groups of E / G; a group scores the sum of its top
  (topk // group_topk) choice values, each token keeps its group_topk best groups and picks its
  top k experts among theirs;
- latent: the router reads the full-width token; fc1_latent_proj (H -> L) feeds the routed
  experts, which run at width L, and their weighted sum goes through fc2_latent_proj (L -> H);
  the shared expert reads the full-width token.

Everything runs in float64, where our vectorized layer and the loops below differ only in
summation order (~1e-16 relative per sum), hence 1e-9 relative (tests/test_layers.py's TOL).
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from conftest import small_config
from test_layers import TOL, randomize, switch_loss_reference
from test_training import TINY

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.config import ConfigError
from megatron_hybrid.flops import layer_forward_flops_per_token, parameter_count
from megatron_hybrid.layers.moe import MoELayer, TopKRouter
from megatron_hybrid.model import HybridModel
from megatron_hybrid.specs import SPECS
from megatron_hybrid.training.arguments import build_parser, model_config_from_args
from megatron_hybrid.training.cli import main
from megatron_hybrid.training.trainer import run_training

HIDDEN, LATENT = 32, 12
# 8 experts in 4 groups of 2; top-4 from the best 2 groups, each scored by its top 4 // 2 = 2.
GROUPS = dict(
    num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2
)
BIAS = torch.tensor([0.3, -0.2, 0.1, 0.0, -0.4, 0.25, 0.05, -0.1], dtype=torch.float64)


def moe_config(**overrides):
    return small_config("E", **{**GROUPS, **overrides})


# -- the reference ------------------------------------------------------------------------------
def reference_route(router: TopKRouter, logits: torch.Tensor, config):
    """One token's (chosen experts, routing weights) from its router logits, by definition."""
    num_experts, topk = len(logits), config.moe_router_topk
    softmax = config.moe_router_score_function == "softmax"
    if softmax:
        probs = torch.exp(logits - logits.max())
        probs = probs / probs.sum()
    else:
        probs = 1 / (1 + torch.exp(-logits))
    if router.expert_bias is not None:
        choice = probs + router.expert_bias
    elif softmax and not config.moe_router_pre_softmax:
        choice = logits
    else:
        choice = probs
    value = [float(v) for v in choice.detach()]
    candidates = list(range(num_experts))
    if config.moe_router_num_groups is not None:
        size = num_experts // config.moe_router_num_groups
        per_group = topk // config.moe_router_group_topk
        group_score = [
            sum(sorted(value[g * size : (g + 1) * size], reverse=True)[:per_group])
            for g in range(config.moe_router_num_groups)
        ]
        best = sorted(range(len(group_score)), key=lambda g: -group_score[g])
        kept = set(best[: config.moe_router_group_topk])
        candidates = [e for e in candidates if e // size in kept]
    chosen = sorted(candidates, key=lambda e: -value[e])[:topk]
    if softmax and not config.moe_router_pre_softmax:  # softmax over the chosen logits
        weights = torch.exp(logits[chosen] - logits[chosen].max())
        weights = weights / weights.sum()
    else:
        weights = probs[chosen]
        if not softmax and topk > 1:
            weights = weights / weights.sum()
    if config.moe_router_topk_scaling_factor is not None:
        weights = weights * config.moe_router_topk_scaling_factor
    return chosen, weights


def squared_relu_mlp(fc1: torch.Tensor, fc2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return fc2 @ torch.clamp(fc1 @ x, min=0) ** 2


def reference_moe(layer: MoELayer, x_NH: torch.Tensor, config):
    """Every token's MoE output, and the experts it was routed to."""
    router, experts = layer.router, layer.experts
    outputs, routes = [], []
    for x in x_NH:
        chosen, weights = reference_route(router, router.weight @ x, config)
        inner = x if layer.fc1_latent_proj is None else layer.fc1_latent_proj.weight @ x
        routed = sum(
            w * squared_relu_mlp(experts.linear_fc1.weight[e], experts.linear_fc2.weight[e], inner)
            for w, e in zip(weights, chosen, strict=True)
        )
        if layer.fc2_latent_proj is not None:
            routed = layer.fc2_latent_proj.weight @ routed
        if layer.shared_experts is not None:
            shared = layer.shared_experts
            routed = routed + squared_relu_mlp(
                shared.linear_fc1.weight, shared.linear_fc2.weight, x
            )
        outputs.append(routed)
        routes.append(sorted(chosen))
    return torch.stack(outputs), routes


def random_layer(config, seed: int = 0) -> MoELayer:
    layer = randomize(MoELayer(config), seed)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(BIAS)
    return layer


def plain_topk_routes(layer: MoELayer, x_NH: torch.Tensor, config) -> list[list[int]]:
    """The experts each token would get without groups (the same choice values)."""
    ungrouped = dataclasses.replace(config, moe_router_num_groups=None, moe_router_group_topk=None)
    return [
        sorted(reference_route(layer.router, layer.router.weight @ x, ungrouped)[0]) for x in x_NH
    ]


ROUTERS_AND_LATENT = [
    ("softmax", {}),
    ("softmax_pre_softmax", dict(moe_router_pre_softmax=True)),
    ("softmax_expert_bias", dict(moe_router_enable_expert_bias=True)),
    ("sigmoid", dict(moe_router_score_function="sigmoid")),
    (
        "sigmoid_expert_bias_scaled",
        dict(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=2.5,
        ),
    ),
    (
        # Both experts from the one group with the largest pair sum. (With topk == group_topk
        # groups never matter: the groups of the global top k have the largest maxima.)
        "sigmoid_top2_of_one_group",
        dict(moe_router_score_function="sigmoid", moe_router_topk=2, moe_router_group_topk=1),
    ),
    # topk // group_topk other than 2 (transformers' nemotron_h always sums the top 2): groups
    # scored by their best expert, and by their top three of four.
    ("softmax_top3_from_two_groups_by_their_best", dict(moe_router_topk=3)),
    (
        "sigmoid_expert_bias_top3_of_one_group_of_four",
        dict(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_topk=3,
            moe_router_num_groups=2,
            moe_router_group_topk=1,
        ),
    ),
    (
        "latent",
        dict(moe_latent_size=LATENT, moe_router_num_groups=None, moe_router_group_topk=None),
    ),
    (
        "latent_sigmoid_expert_bias_shared",
        dict(
            moe_latent_size=LATENT,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_shared_expert_intermediate_size=20,
        ),
    ),
    ("latent_softmax_shared", dict(moe_latent_size=LATENT, moe_shared_expert_intermediate_size=20)),
]


@pytest.mark.parametrize(
    "overrides", [o for _, o in ROUTERS_AND_LATENT], ids=[n for n, _ in ROUTERS_AND_LATENT]
)
def test_forward_and_gradients_match_the_token_by_token_reference(overrides):
    config = moe_config(**overrides)
    layer = random_layer(config)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    expected, routes = reference_moe(layer, x.reshape(-1, HIDDEN), config)
    torch.testing.assert_close(out, expected.view_as(x), **TOL)

    _, indices, _ = layer.router(x.detach().reshape(-1, HIDDEN))
    assert indices.sort(-1).values.tolist() == routes
    if config.moe_router_num_groups is not None:  # the groups decide some tokens' experts
        assert routes != plain_topk_routes(layer, x.detach().reshape(-1, HIDDEN), config)

    leaves = [x, *layer.parameters()]
    grad_out = torch.randn(
        out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected.view_as(x), leaves, grad_out)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g, w in zip(names, got, want, strict=True):
        assert w.abs().max() > 0, name  # every tensor takes part
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_softmax_groups_are_scored_by_logits_as_in_megatron():
    """Softmax routing without pre-softmax chooses by the logits (Megatron-Core), so a group
    scores the sum of its top logits; the sum of its top probabilities ranks groups differently
    for some tokens."""
    config = moe_config(moe_router_topk=4, moe_router_group_topk=2)
    layer = random_layer(config, seed=3)
    x = torch.randn(200, HIDDEN, dtype=torch.float64)
    _, indices, _ = layer.router(x)
    by_logits = reference_moe(layer, x, config)[1]
    assert indices.sort(-1).values.tolist() == by_logits
    config.moe_router_pre_softmax = True  # the reference then chooses by the probabilities
    by_probs = [
        sorted(reference_route(layer.router, layer.router.weight @ t, config)[0]) for t in x
    ]
    assert by_probs != by_logits


@pytest.mark.parametrize("expert_bias", [False, True], ids=["no_bias", "expert_bias"])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_aux_loss_counts_the_unrestricted_top_k_and_bias_counts_the_routed(
    score_function, expert_bias
):
    """Megatron-Core's compute_routing_scores_for_aux_loss: the switch loss counts every token's
    top k of the unbiased scores over all experts, whatever the groups allow; the expert-bias
    counts are the experts the tokens were routed to."""
    config = moe_config(
        moe_router_score_function=score_function,
        moe_router_enable_expert_bias=expert_bias,
        moe_aux_loss_coeff=0.1,
    )
    router = randomize(TopKRouter(config)).train()
    if expert_bias:
        router.expert_bias.copy_(BIAS)
    x = torch.randn(31, HIDDEN, dtype=torch.float64)
    _, indices, aux = router(x)
    expected = switch_loss_reference(router, x)
    torch.testing.assert_close(aux, expected, **TOL)
    grad, expected_grad = (torch.autograd.grad(loss, router.weight) for loss in (aux, expected))
    torch.testing.assert_close(grad[0], expected_grad[0], **TOL)
    counts = torch.bincount(indices.flatten(), minlength=8).to(router.tokens_per_expert)
    assert torch.equal(router.tokens_per_expert, counts)


# -- config checks and flags ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(moe_router_group_topk=None),
            "set both --moe-router-num-groups and --moe-router-group-topk",
        ),
        (
            dict(moe_router_num_groups=None),
            "set both --moe-router-num-groups and --moe-router-group-topk",
        ),
        (
            dict(moe_router_num_groups=3),
            "--num-experts 8 is not divisible by --moe-router-num-groups 3",
        ),
        (
            dict(moe_router_group_topk=5),
            "--moe-router-group-topk 5 exceeds --moe-router-num-groups 4",
        ),
        (dict(moe_router_topk=1), "--moe-router-topk 1 is below --moe-router-group-topk 2"),
        (dict(moe_router_topk=5), "--moe-router-topk 5 exceeds the 4 experts"),
        (dict(moe_router_group_topk=0), "moe_router_group_topk must be a positive number"),
        (dict(moe_latent_size=0), "moe_latent_size must be a positive number"),
    ],
)
def test_bad_latent_and_group_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        moe_config(**overrides)


def test_groups_that_are_all_kept_allow_any_top_k():
    # Every group kept: routing is plain top-k, whatever the groups' scores (top 1 // 4 = 0).
    config = moe_config(moe_router_topk=1, moe_router_group_topk=4)
    layer = random_layer(config)
    x = torch.randn(17, HIDDEN, dtype=torch.float64)
    _, indices, _ = layer.router(x)
    assert torch.equal(indices, (x @ layer.router.weight.T).argmax(-1, keepdim=True))


def test_flags_set_the_latent_and_group_fields():
    args = build_parser().parse_args(
        [
            *TINY,
            "--hybrid-layer-pattern",
            "ME",
            "--num-experts",
            "8",
            "--moe-latent-size",
            "16",
            "--moe-router-num-groups",
            "4",
            "--moe-router-group-topk",
            "2",
        ]
    )
    config = model_config_from_args(args, 64)
    assert (config.moe_latent_size, config.moe_router_num_groups, config.moe_router_group_topk) == (
        16,
        4,
        2,
    )
    defaults = model_config_from_args(build_parser().parse_args(TINY), 64)
    assert (defaults.moe_latent_size, defaults.moe_router_num_groups) == (None, None)


def test_bad_group_flags_stop_with_a_message(capsys):
    code = main([*TINY, "--moe-router-num-groups", "3", "--moe-router-group-topk", "1"])
    assert code == 2
    assert (
        "--num-experts 4 is not divisible by --moe-router-num-groups 3" in capsys.readouterr().err
    )
    assert main([*TINY, "--moe-latent-size", "-4"]) == 2
    assert "--moe-latent-size must be a whole number of at least 1" in capsys.readouterr().err


# -- initialization, parameters, FLOPs, keys ------------------------------------------------------
def test_latent_projections_are_initialized_as_megatron_does():
    """fc1_latent_proj with init_method (N(0, std)), fc2_latent_proj with the output-layer init
    (N(0, std / sqrt(2 * layers))), as Megatron-Core's MoELayer builds them."""
    config = small_config(
        "M-E", hidden_size=64, num_moe_experts=4, moe_latent_size=48, init_method_std=0.05
    )
    layer = HybridModel(config).decoder.layers["2"].channel_mixer
    fc1, fc2 = layer.fc1_latent_proj.weight, layer.fc2_latent_proj.weight
    assert fc1.shape == (48, 64) and fc2.shape == (64, 48)
    assert layer.experts.linear_fc1.weight.shape == (4, config.moe_ffn_hidden_size, 48)
    assert layer.experts.linear_fc2.weight.shape == (4, 48, config.moe_ffn_hidden_size)
    # 3072 samples each: the sample std is within 5% of the true one with overwhelming odds.
    assert float(fc1.detach().std()) == pytest.approx(0.05, rel=0.05)
    assert float(fc2.detach().std()) == pytest.approx(0.05 / math.sqrt(2 * 3), rel=0.05)


def test_canonical_keys_are_megatron_cores():
    config = small_config("[ME]", moe_latent_size=LATENT)
    keys = {canonical_key(n, config.pattern) for n in HybridModel(config).state_dict()}
    assert {
        "decoder.layers.1.mlp.fc1_latent_proj.weight",
        "decoder.layers.1.mlp.fc2_latent_proj.weight",
    } <= keys
    assert not any("bias" in k for k in keys if "latent" in k)  # add_bias_linear=False


@pytest.mark.parametrize(
    "overrides",
    [
        dict(moe_latent_size=LATENT),
        dict(moe_latent_size=LATENT, moe_shared_expert_intermediate_size=20, activation="swiglu"),
        dict(moe_latent_size=LATENT, **GROUPS),
    ],
)
def test_parameter_count_matches_the_built_model(overrides):
    config = small_config("M[*E]-E", **overrides)
    assert parameter_count(config) == HybridModel(config).num_parameters()


def test_latent_moe_flops_by_hand():
    """Megatron's moe_layer_flops with a latent size: router 2HE, k experts at width L, the two
    projections 2 * 2HL, the shared expert at full width."""
    H, E, k, F, L, S = 32, 8, 4, 24, 12, 20
    config = moe_config(moe_latent_size=L, moe_shared_expert_intermediate_size=S)
    expected = 2 * H * E + k * (2 * L * F + 2 * F * L) + 2 * (2 * H * L) + (2 * H * S + 2 * S * H)
    assert layer_forward_flops_per_token(config, "E", 16) == expected
    # Group-limited routing changes which experts, not how many: the same FLOPs as without.
    ungrouped = small_config(
        "E",
        num_moe_experts=8,
        moe_router_topk=4,
        moe_latent_size=L,
        moe_shared_expert_intermediate_size=S,
    )
    assert layer_forward_flops_per_token(ungrouped, "E", 16) == expected
    assert SPECS["E"].parameter_count(config) == (
        E * H + E * (L * F + F * L) + 2 * H * L + (H * S + S * H)
    )


# -- the embedded default run ---------------------------------------------------------------------
def test_default_run_with_latent_and_group_limited_moe_loss_falls():
    """The default model and data with a latent, group-routed MoE layer: a few short steps
    learn (the full default run is in the README)."""
    result = run_training(
        build_parser().parse_args(
            [
                "--moe-latent-size",
                "64",
                "--moe-router-num-groups",
                "2",
                "--moe-router-group-topk",
                "1",
                "--train-iters",
                "12",
                "--micro-batch-size",
                "4",
                "--seq-length",
                "64",
                "--lr-warmup-iters",
                "2",
                "--eval-iters",
                "0",
                "--generate-tokens",
                "0",
                "--no-progress-bar",
            ]
        )
    )
    layer = result.model.moe_layers()[0]
    assert layer.fc1_latent_proj.weight.shape == (64, 128)
    assert (layer.router.num_groups, layer.router.group_topk) == (2, 1)
    # Measured: 5.5 nats over the first three steps, 3.5 over the last three.
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 1.0, (first, last)
