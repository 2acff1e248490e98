"""Each mixer against an independent, straightforward float64 reference on random inputs.

The references below re-derive the math from its definition (explicit loops over time steps,
tokens and heads, explicit masks) rather than calling the layers' own helpers, so a shared
mistake cannot hide. Everything runs in float64, where the only differences are summation
order, hence the tight tolerances (1e-9 relative)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from megatron_hybrid.config import ConfigError
from megatron_hybrid.layers.attention import SelfAttention
from megatron_hybrid.layers.mamba2 import Mamba2Mixer
from megatron_hybrid.layers.mlp import MLP
from megatron_hybrid.layers.moe import MoELayer, TopKRouter
from megatron_hybrid.layers.norm import GatedRMSNorm, RMSNorm
from megatron_hybrid.model import HybridModel

TOL = dict(rtol=1e-9, atol=1e-10)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 copy with every parameter random (not the structured init): no zeros, no ones."""
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return module


# -- norms ------------------------------------------------------------------------------------
def test_rms_norm_matches_definition():
    norm = randomize(RMSNorm(16, eps=1e-5))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, **TOL)


def test_gated_rms_norm_normalizes_each_group_after_the_gate():
    norm = randomize(GatedRMSNorm(12, group_size=4, eps=1e-5))
    x, z = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 3, 12, dtype=torch.float64)
    gated = x * z * torch.sigmoid(z)
    expected = torch.empty_like(x)
    for g in range(3):
        part = gated[..., 4 * g : 4 * g + 4]
        expected[..., 4 * g : 4 * g + 4] = part / torch.sqrt(
            part.pow(2).mean(-1, keepdim=True) + 1e-5
        )
    torch.testing.assert_close(norm(x, z), expected * norm.weight, **TOL)


# -- Mamba2 -----------------------------------------------------------------------------------
def mamba2_reference(
    mixer: Mamba2Mixer, u: torch.Tensor, dt_limit: tuple[float, float] = (0.0, math.inf)
) -> torch.Tensor:
    """Sequential Mamba2: conv and SSM recurrence one time step at a time, dt clamped to
    `dt_limit` after softplus."""
    batch, seq, _ = u.shape
    nh, hp, ng, ns = mixer.num_heads, mixer.head_dim, mixer.num_groups, mixer.state_dim
    d_inner, conv_dim = nh * hp, nh * hp + 2 * ng * ns
    proj = u @ mixer.in_proj.weight.T
    z, xbc, dt = proj[..., :d_inner], proj[..., d_inner : d_inner + conv_dim], proj[..., -nh:]
    weight, kernel = mixer.conv1d.weight[:, 0, :], mixer.conv1d.weight.shape[-1]
    conv = mixer.conv1d.bias.expand(batch, seq, conv_dim).clone()
    for t in range(seq):
        for k in range(kernel):
            src = t - (kernel - 1) + k
            if src >= 0:
                conv[:, t] += weight[:, k] * xbc[:, src]
    xbc = conv * torch.sigmoid(conv)
    x = xbc[..., :d_inner].reshape(batch, seq, nh, hp)
    b = xbc[..., d_inner : d_inner + ng * ns].reshape(batch, seq, ng, ns)
    c = xbc[..., d_inner + ng * ns :].reshape(batch, seq, ng, ns)
    dt = F.softplus(dt + mixer.dt_bias).clamp(min=dt_limit[0], max=dt_limit[1])
    a = -torch.exp(mixer.A_log)
    y = torch.zeros(batch, seq, nh, hp, dtype=u.dtype)
    state = torch.zeros(batch, nh, hp, ns, dtype=u.dtype)
    for t in range(seq):
        for h in range(nh):
            g = h // (nh // ng)
            decay = torch.exp(dt[:, t, h] * a[h])[:, None, None]
            inject = dt[:, t, h, None, None] * x[:, t, h, :, None] * b[:, t, g, None, :]
            state[:, h] = decay * state[:, h] + inject
            y[:, t, h] = (state[:, h] * c[:, t, g, None, :]).sum(-1) + mixer.D[h] * x[:, t, h]
    y = y.reshape(batch, seq, d_inner) * z * torch.sigmoid(z)
    group = d_inner // ng
    normed = torch.empty_like(y)
    for g in range(ng):
        part = y[..., g * group : (g + 1) * group]
        normed[..., g * group : (g + 1) * group] = part / torch.sqrt(
            part.pow(2).mean(-1, keepdim=True) + mixer.norm.eps
        )
    return (normed * mixer.norm.weight) @ mixer.out_proj.weight.T


@pytest.mark.parametrize("seq", [8, 19])  # a multiple of the chunk size (8) and not
@pytest.mark.parametrize("groups", [1, 2])
def test_mamba2_mixer_matches_sequential_recurrence(seq, groups):
    config = small_config("M", mamba_num_groups=groups)
    mixer = randomize(Mamba2Mixer(config))
    with torch.no_grad():  # keep the decay in a realistic range: A in [-16, -1], dt ~ 0.01-1
        mixer.A_log.uniform_(0.0, math.log(16.0))
        mixer.dt_bias.uniform_(-4.0, 0.5)
    u = torch.randn(2, seq, config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(mixer(u), mamba2_reference(mixer, u), **TOL)


@pytest.mark.parametrize("floor,ceiling", [(0.05, None), (0.0, 0.6), (0.05, 0.6)])
def test_mamba2_mixer_clamps_dt_to_the_configured_floor_and_ceiling(floor, ceiling):
    config = small_config("M", mamba_dt_floor=floor, mamba_dt_ceiling=ceiling)
    mixer = randomize(Mamba2Mixer(config))
    with torch.no_grad():  # softplus(dt + dt_bias) from ~0.002 to ~3: both ends get clamped
        mixer.A_log.uniform_(0.0, math.log(16.0))
        mixer.dt_bias.copy_(torch.linspace(-6.0, 3.0, mixer.num_heads, dtype=torch.float64))
    u = torch.randn(2, 19, config.hidden_size, dtype=torch.float64)
    dt_limit = (floor, math.inf if ceiling is None else ceiling)
    ours = mixer(u)
    torch.testing.assert_close(ours, mamba2_reference(mixer, u, dt_limit), **TOL)
    assert (ours - mamba2_reference(mixer, u)).abs().max() > 1e-3  # the clamp changed dt


@pytest.mark.parametrize(
    "fields,message",
    [
        (
            {"mamba_dt_floor": -0.1},
            r"mamba_dt_floor \(--mamba-dt-floor\) must be a finite number >= 0",
        ),
        ({"mamba_dt_floor": math.nan}, "mamba_dt_floor .* got nan"),
        ({"mamba_dt_floor": math.inf}, "mamba_dt_floor .* got inf"),
        (
            {"mamba_dt_floor": 0.1, "mamba_dt_ceiling": 0.1},
            r"mamba_dt_ceiling \(--mamba-dt-ceiling\) must be above mamba_dt_floor=0.1, got 0.1",
        ),
        ({"mamba_dt_ceiling": -1.0}, "must be above mamba_dt_floor=0.0, got -1.0"),
        ({"mamba_dt_ceiling": math.nan}, "got nan; valid: a larger number, or inf / None"),
    ],
)
def test_bad_dt_clamp_settings_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        small_config("M-", **fields)


def test_an_infinite_dt_ceiling_is_no_ceiling():
    config = small_config("M-", mamba_dt_ceiling=math.inf)
    assert config.mamba_dt_ceiling is None and config.mamba_dt_limit == (0.0, math.inf)
    assert config.to_dict() == small_config("M-").to_dict()  # plain JSON, no Infinity


def test_mamba2_mixer_is_causal():
    mixer = randomize(Mamba2Mixer(small_config("M")))
    u = torch.randn(1, 12, 32, dtype=torch.float64)
    changed = u.clone()
    changed[:, 7:] = torch.randn(1, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(mixer(u)[:, :7], mixer(changed)[:, :7], **TOL)


# -- attention --------------------------------------------------------------------------------
def attention_reference(attn: SelfAttention, u: torch.Tensor, rope: bool) -> torch.Tensor:
    """Per-head attention with an explicit causal mask, reading q/k/v from the grouped layout
    row by row: group g holds rows [g*(q_per_g+2)*d, ...) = q heads, then k, then v."""
    batch, seq, _ = u.shape
    heads, groups, d = attn.num_heads, attn.num_groups, attn.head_dim
    per_group = heads // groups
    qkv = u @ attn.linear_qkv.weight.T

    def rows(start):
        return qkv[..., start * d : (start + 1) * d]

    def rotate(v):  # v: (batch, seq, d); pair (j, j + d/2) rotated by t * base^(-2j/d)
        out = v.clone()
        for t in range(seq):
            for j in range(d // 2):
                angle = t * attn.rotary_base ** (-2 * j / d)
                a, b = v[:, t, j], v[:, t, j + d // 2]
                out[:, t, j] = a * math.cos(angle) - b * math.sin(angle)
                out[:, t, j + d // 2] = a * math.sin(angle) + b * math.cos(angle)
        return out

    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    outputs = []
    for h in range(heads):
        g, i = divmod(h, per_group)
        base = g * (per_group + 2)
        q, k, v = rows(base + i), rows(base + per_group), rows(base + per_group + 1)
        if rope:
            q, k = rotate(q), rotate(k)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(d)
        scores = scores.masked_fill(mask, float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outputs, dim=-1) @ attn.linear_proj.weight.T


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_attention_matches_explicit_masked_reference(rope, groups):
    config = small_config(
        "*", num_query_groups=groups, position_embedding_type="rope" if rope else "none"
    )
    attn = randomize(SelfAttention(config))
    u = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(attn(u), attention_reference(attn, u, rope), **TOL)


# -- MLP --------------------------------------------------------------------------------------
def test_squared_relu_mlp_matches_definition():
    mlp = randomize(MLP(16, 24, "squared_relu"))
    x = torch.randn(4, 16, dtype=torch.float64)
    hidden = torch.clamp(x @ mlp.linear_fc1.weight.T, min=0) ** 2
    torch.testing.assert_close(mlp(x), hidden @ mlp.linear_fc2.weight.T, **TOL)


def test_swiglu_mlp_activates_the_first_half_of_fc1():
    mlp = randomize(MLP(16, 24, "swiglu"))
    x = torch.randn(4, 16, dtype=torch.float64)
    gate = x @ mlp.linear_fc1.weight[:24].T
    up = x @ mlp.linear_fc1.weight[24:].T
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.linear_fc2.weight.T
    torch.testing.assert_close(mlp(x), expected, **TOL)


# -- MoE --------------------------------------------------------------------------------------
def moe_reference(layer: MoELayer, x: torch.Tensor, config) -> torch.Tensor:
    """Token by token: score every expert, pick the top k, run each chosen expert's MLP."""
    router, experts = layer.router, layer.experts
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = router.weight @ x[n]
        if config.moe_router_score_function == "softmax":
            scores = torch.exp(logits - logits.max())
            scores = scores / scores.sum()
        else:
            scores = 1 / (1 + torch.exp(-logits))
        choice = scores + (router.expert_bias if router.expert_bias is not None else 0)
        chosen = sorted(range(len(choice)), key=lambda e: -float(choice[e].detach()))[: router.topk]
        # Megatron-Core's topk_routing_with_score_function: softmax over the chosen logits;
        # pre-softmax: the chosen probabilities as they are; sigmoid: normalized when k > 1.
        if config.moe_router_score_function == "softmax" and not config.moe_router_pre_softmax:
            chosen_logits = logits[chosen]
            weights = torch.exp(chosen_logits - chosen_logits.max())
            weights = weights / weights.sum()
        else:
            weights = scores[chosen]
            if config.moe_router_score_function == "sigmoid" and router.topk > 1:
                weights = weights / weights.sum()
        if config.moe_router_topk_scaling_factor is not None:
            weights = weights * config.moe_router_topk_scaling_factor
        for w, e in zip(weights, chosen, strict=True):
            h = experts.linear_fc1.weight[e] @ x[n]
            if config.activation == "swiglu":
                gate, up = h.chunk(2)
                h = gate * torch.sigmoid(gate) * up
            else:
                h = torch.clamp(h, min=0) ** 2
            out[n] += w * (experts.linear_fc2.weight[e] @ h)
        if layer.shared_experts is not None:
            out[n] += layer.shared_experts(x[n : n + 1])[0]
    return out


MOE_VARIANTS = {
    "softmax": {},
    "softmax_pre_softmax": dict(moe_router_pre_softmax=True),
    "softmax_top1": dict(moe_router_topk=1),
    "sigmoid_top1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    "sigmoid_bias_scaled_shared": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_shared_expert_intermediate_size=20,
    ),
    "swiglu": dict(activation="swiglu"),
}


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_moe_matches_per_token_reference(variant):
    config = small_config("E", **MOE_VARIANTS[variant])
    layer = randomize(MoELayer(config))
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    x = torch.randn(2, 11, config.hidden_size, dtype=torch.float64)
    expected = moe_reference(layer, x.reshape(-1, config.hidden_size), config)
    torch.testing.assert_close(layer(x), expected.view_as(x), **TOL)


def test_moe_aux_loss_reaches_router_gradients():
    config = small_config("E", moe_aux_loss_coeff=0.1)
    layer = randomize(MoELayer(config)).train()
    layer.aux_loss_grad_scale = 0.5
    x = torch.randn(3, 7, config.hidden_size, dtype=torch.float64)
    layer(x).sum().backward()
    with_aux = layer.router.weight.grad.clone()

    layer.zero_grad()
    layer.router.aux_loss_coeff = 0.0
    out = layer(x)
    # Switch loss from its definition: E * coeff / (k * N^2) * sum_e count_e * sum_n p_ne.
    x_flat = x.reshape(-1, config.hidden_size)
    probs = torch.softmax(x_flat @ layer.router.weight.T, dim=-1)
    counts = torch.zeros(4, dtype=torch.float64)
    for row in probs.topk(2, dim=-1).indices:
        counts[row] += 1
    n = x_flat.shape[0]
    aux = 4 * 0.1 / (2 * n * n) * (counts * probs.sum(0)).sum()
    (out.sum() + 0.5 * aux).backward()
    torch.testing.assert_close(with_aux, layer.router.weight.grad, **TOL)
    assert float(layer.last_aux_loss) == pytest.approx(float(aux.detach()), rel=1e-9)


def switch_loss_reference(router: TopKRouter, x_NH: torch.Tensor) -> torch.Tensor:
    """Megatron's switch load-balancing loss, token by token from its definition:
    E * coeff / (k * N^2) * sum_e (tokens routed to e) * (sum over tokens of p_e), where a
    token's p is softmax(logits), or sigmoid(logits) normalized to sum to one over the experts;
    tokens are counted by the top-k of p *without* the expert bias (Megatron-Core's
    compute_routing_scores_for_aux_loss: the loss balances the router's own preference)."""
    num_experts, topk, num_tokens = router.num_experts, router.topk, x_NH.shape[0]
    counts = [0] * num_experts
    prob_sums = x_NH.new_zeros(num_experts)
    for n in range(num_tokens):
        logits = router.weight @ x_NH[n]
        if router.score_function == "softmax":
            scores = torch.exp(logits - logits.max())
            scores = scores / scores.sum()
            probs = scores
        else:
            scores = 1 / (1 + torch.exp(-logits))
            probs = scores / scores.sum()
        choice = [float(probs[e].detach()) for e in range(num_experts)]
        for e in sorted(range(num_experts), key=lambda e: -choice[e])[:topk]:
            counts[e] += 1
        prob_sums = prob_sums + probs
    loss = sum(counts[e] * prob_sums[e] for e in range(num_experts))
    return num_experts * router.aux_loss_coeff / (topk * num_tokens**2) * loss


AUX_LOSS_ROUTERS = {
    "softmax": {},
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "softmax_top1": dict(moe_router_topk=1),
    "sigmoid_top1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
}


@pytest.mark.parametrize("expert_bias", [False, True], ids=["no_bias", "expert_bias"])
@pytest.mark.parametrize("variant", list(AUX_LOSS_ROUTERS))
def test_moe_aux_loss_matches_per_token_switch_loss(variant, expert_bias):
    config = small_config(
        "E",
        moe_aux_loss_coeff=0.1,
        moe_router_enable_expert_bias=expert_bias,
        **AUX_LOSS_ROUTERS[variant],
    )
    router = randomize(TopKRouter(config)).train()
    if expert_bias:  # large enough to change some tokens' experts (asserted below)
        router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    x = torch.randn(23, config.hidden_size, dtype=torch.float64)
    _, indices, aux = router(x)
    expected = switch_loss_reference(router, x)
    torch.testing.assert_close(aux, expected, **TOL)
    # The router's gradient from the aux loss: what balances the load in training.
    grad, expected_grad = (torch.autograd.grad(loss, router.weight) for loss in (aux, expected))
    torch.testing.assert_close(grad[0], expected_grad[0], **TOL)
    if expert_bias:
        unbiased = (router.weight @ x.T).T.topk(router.topk, dim=-1).indices
        assert not torch.equal(indices.sort(-1).values, unbiased.sort(-1).values)


def test_eval_forwards_leave_the_expert_bias_token_counts_unchanged():
    # Only training forwards count: validation and generation must not steer the balancing.
    config = small_config("ME", moe_router_enable_expert_bias=True)
    model = HybridModel(config)
    router = model.decoder.layers["1"].channel_mixer.router
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    model(tokens)
    with torch.no_grad():
        model(tokens)
    assert torch.equal(router.tokens_per_expert, torch.zeros(config.num_moe_experts))
    model.train()
    model(tokens)
    counted = router.tokens_per_expert.clone()
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert torch.equal(router.tokens_per_expert, counted)


def test_expert_bias_moves_towards_balanced_load():
    config = small_config("E", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01)
    layer = MoELayer(config).train()
    layer.router.tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    layer.router.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert layer.router.tokens_per_expert.sum() == 0


def test_model_update_expert_biases_uses_tokens_routed_in_training():
    config = small_config("ME", moe_router_enable_expert_bias=True)
    model = HybridModel(config).train()
    model(torch.randint(0, 64, (2, 16)))
    router = model.decoder.layers["1"].channel_mixer.router
    assert router.tokens_per_expert.sum() == 2 * 16 * config.moe_router_topk
    model.update_expert_biases()
    assert router.expert_bias.abs().sum() > 0
