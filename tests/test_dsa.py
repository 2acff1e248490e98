"""DeepSeek sparse attention (`D`): the layer against a float64 reference written from
DeepSeek-V3.2's equations (lightning indexer scores, an explicit top-k mask built query by query,
masked softmax attention over MLA's decompressed queries, keys and values, and the indexer's KL
loss), the sparse-attention kernel op, sizes, spec, checkpoint names, FLOPs, fused == unfused and
training runs. Its parallel layouts run with MLA's in tests/test_mla.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb_parameters, small_config
from test_mla import (
    FLOAT32_VS_FLOAT64,
    MLA_OPTIONS,
    SIZES,
    attend_and_project,
    attention_scores,
    causal,
    decompress,
    layer_keys,
    randomized,
    relative_error,
    rope_parameters,
)
from test_training import short_default_run, train

from megatron_hybrid.canonical import canonical_key
from megatron_hybrid.checkpointing.hf_nemotron_h import export_problems
from megatron_hybrid.config import ConfigError
from megatron_hybrid.flops import layer_forward_flops_per_token, parameter_count
from megatron_hybrid.kernels.registry import eager_kernels
from megatron_hybrid.layers.dsa import DeepSeekSparseAttention
from megatron_hybrid.model import HybridModel

# 4 indexer heads of width 6 (rope on its first 4 dims); each query keeps its top 3 keys.
INDEXER = dict(dsa_indexer_n_heads=4, dsa_indexer_head_dim=6, dsa_indexer_topk=3)
VARIANTS = {
    "untrained-indexer": dict(rope_type="rope"),
    "dense-kl-loss": dict(**MLA_OPTIONS, rope_type="rope", dsa_indexer_loss_coeff=0.3),
    "sparse-kl-loss-yarn": dict(
        **MLA_OPTIONS,
        rope_type="yarn",
        rotary_scaling_factor=4.0,
        original_max_position_embeddings=32,
        mscale=0.9,
        mscale_all_dim=0.6,
        dsa_indexer_loss_coeff=0.3,
        dsa_indexer_use_sparse_loss=True,
    ),
}
INDEXER_PREFIX = "core_attention.indexer."


def dsa_config(pattern: str = "D", **overrides):
    return small_config(pattern, **{**SIZES, **INDEXER, **overrides})


# -- the float64 reference ------------------------------------------------------------------------
def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def rope_half_split(x, inv_freq, scale):
    """Rotate pairs (i, i + dr/2) of the first dr = 2 len(inv_freq) dims of x (B, T, ..., di)
    by position * inv_freq[i], as complex numbers, times `scale`."""
    seq, half = x.shape[1], len(inv_freq)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq.double())
    rotation = torch.polar(torch.full_like(angles, scale), angles)
    rotation = rotation.view(1, seq, *([1] * (x.dim() - 3)), half)
    z = torch.complex(x[..., :half], x[..., half : 2 * half]) * rotation
    return torch.cat([z.real, z.imag, x[..., 2 * half :]], dim=-1)


def index_scores(p: dict, x: torch.Tensor, c_q: torch.Tensor, config) -> torch.Tensor:
    """DeepSeek-V3.2 eq. (1): I[t, s] = sum_j w[t, j] relu(q^I[t, j] . k^I[s]), for s <= t
    (-inf elsewhere); the indexer's inputs detached from the model."""
    batch, seq, _ = x.shape
    ni, di = config.dsa_indexer_n_heads, config.dsa_indexer_head_dim
    x, c_q = x.detach(), c_q.detach()
    inv_freq, concentration = rope_parameters(config)
    q = (c_q @ p[INDEXER_PREFIX + "linear_wq_b.weight"].T).view(batch, seq, ni, di)
    k = layer_norm(
        x @ p[INDEXER_PREFIX + "linear_wk.weight"].T,
        p[INDEXER_PREFIX + "k_norm.weight"],
        p[INDEXER_PREFIX + "k_norm.bias"],
        config.layernorm_epsilon,
    )
    q = rope_half_split(q, inv_freq, concentration)
    k = rope_half_split(k, inv_freq, concentration)
    w = x @ p[INDEXER_PREFIX + "linear_weights_proj.weight"].T / math.sqrt(ni) / math.sqrt(di)
    scores = torch.einsum("btj,btjs->bts", w, torch.relu(torch.einsum("btjd,bsd->btjs", q, k)))
    return scores.masked_fill(~causal(batch, seq), float("-inf"))


def explicit_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, S) mask: for each query t, its k highest-scoring keys s <= t (all of them when
    there are at most k; equal scores to the earlier key), chosen one query at a time by
    sorting."""
    batch, seq, _ = scores.shape
    keep = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for t in range(seq):
            ranked = sorted(range(t + 1), key=lambda s: -scores[b, t, s].item())
            keep[b, t, ranked[:k]] = True
    return keep


def smallest_top_k_gap(scores: torch.Tensor, k: int) -> float:
    """The smallest gap, over queries with more than k keys, between the k-th and (k+1)-th
    highest scores where they differ: float32 rounding cannot change the selection when it is
    above that rounding. (Exact ties, scores where every head's relu is 0, are exact in float32
    too, and go to the earlier key in both.)"""
    gaps = [math.inf]
    for row in scores.reshape(-1, scores.shape[-1]):
        finite = row[torch.isfinite(row)].sort(descending=True).values
        if len(finite) > k and finite[k - 1] != finite[k]:
            gaps.append((finite[k - 1] - finite[k]).item())
    return min(gaps)


def indexer_loss(p, d, scores, keep, config) -> torch.Tensor:
    """coeff * mean_t KL(p_t || softmax_s I[t, s]), p_t the normalized sum over heads of the
    (detached) attention distributions, both over s <= t, or over the kept keys with the sparse
    loss."""
    batch, seq = scores.shape[:2]
    valid = keep if config.dsa_indexer_use_sparse_loss else causal(batch, seq)
    detached = type(d)(*(t.detach() for t in d))
    attention = attention_scores(detached, config).masked_fill(~valid.unsqueeze(1), -math.inf)
    target = attention.softmax(-1).sum(1)
    target = target / target.sum(-1, keepdim=True)
    log_predicted = scores.masked_fill(~valid, -math.inf).log_softmax(-1)
    kl = torch.where(valid, target * (target.clamp(min=1e-10).log() - log_predicted), 0.0)
    return config.dsa_indexer_loss_coeff * kl.sum(-1).mean()


def dsa_reference(p: dict, x: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, indexer loss or 0)."""
    d = decompress(p, x, config)
    scores = index_scores(p, x, d.c_q, config)
    keep = explicit_top_k(scores, config.dsa_indexer_topk)
    out = attend_and_project(p, d, keep, config)
    loss = x.new_zeros(())
    if config.dsa_indexer_loss_coeff > 0:
        loss = indexer_loss(p, d, scores, keep, config)
    return out, loss


# -- the layer against the reference -------------------------------------------------------------
def unambiguous_case(config, seq: int):
    """A random layer (float32), input, upstream gradient and the float64 parameters, for the
    first seed from `seq` on whose top-k choice float32 rounding cannot change (two different
    index scores within float32's rounding of each other at the k-th place). Tries 50 seeds;
    nearly all pass."""
    for seed in range(seq, seq + 50):
        layer = randomized(DeepSeekSparseAttention(config), seed=seed).train()
        params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(2, seq, config.hidden_size, generator=generator)
        upstream = torch.randn(2, seq, config.hidden_size, generator=generator)
        c_q = decompress(params, x.double(), config).c_q
        gap = smallest_top_k_gap(index_scores(params, x.double(), c_q, config), 3)
        if gap > 1e-4:  # float32 index scores are off by ~1e-7
            return layer, params, x, upstream
    raise AssertionError(f"no seed in {seq}..{seq + 49} gives an unambiguous top-k")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seq", [1, 7, 13])  # the top 3 of up to 13 keys: sparse from t = 3 on
def test_dsa_matches_the_reference(variant, seq):
    config = dsa_config(**VARIANTS[variant])
    layer, params, x, upstream = unambiguous_case(config, seq)
    x64 = x.double().requires_grad_()
    out64, loss64 = dsa_reference(params, x64, config)
    ((out64 * upstream.double()).sum() + loss64).backward()
    x32 = x.clone().requires_grad_()
    out32 = layer(x32)
    (out32 * upstream).sum().backward()  # the indexer loss joins through AuxLossInjector
    assert relative_error(out32, out64) <= FLOAT32_VS_FLOAT64
    assert relative_error(x32.grad, x64.grad) <= FLOAT32_VS_FLOAT64
    for name, param in layer.named_parameters():
        expected = params[name].grad
        if name.startswith(INDEXER_PREFIX) and config.dsa_indexer_loss_coeff == 0:
            # Top-k choice has no gradient: without its loss the indexer gets none, as Megatron's.
            assert param.grad is None and expected is None, name
            continue
        assert relative_error(param.grad, expected) <= FLOAT32_VS_FLOAT64, name


def test_the_indexer_loss_reaches_only_the_indexer():
    # The indexer reads detached inputs: its loss alone moves no MLA weight and no input.
    config = dsa_config(**VARIANTS["dense-kl-loss"])
    layer = randomized(DeepSeekSparseAttention(config)).train()
    x = torch.randn(2, 9, config.hidden_size, requires_grad=True)
    layer(x).mul(0).sum().backward()  # zero upstream: only the indexer loss has a gradient
    for name, param in layer.named_parameters():
        touched = param.grad is not None and param.grad.abs().sum() > 0
        assert touched == name.startswith(INDEXER_PREFIX), name
    assert x.grad.abs().sum() == 0


def test_with_all_keys_selected_dsa_is_mla():
    config = dsa_config(dsa_indexer_topk=64)
    layer = randomized(DeepSeekSparseAttention(config))
    x = torch.randn(2, 11, config.hidden_size)
    mla_out = torch.nn.functional.scaled_dot_product_attention  # what MLA's attend runs
    qkv = layer.query_key_value(x)
    dense = mla_out(qkv.query, qkv.key, qkv.value, is_causal=True, scale=layer.softmax_scale)
    expected = layer.linear_proj(dense.transpose(1, 2).flatten(2))
    # float32, two implementations of the same softmax: a few ulps.
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_sparse_attention_op_attends_only_to_listed_keys():
    kernels = eager_kernels()
    generator = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 2, 4, 3, generator=generator),
        torch.randn(1, 2, 4, 3, generator=generator),
    )
    v = torch.randn(1, 2, 4, 5, generator=generator)
    # Query 3 lists keys 0 and 2 (and a -1: no key); the others list their own key only.
    topk = torch.tensor([[[0, -1], [1, 1], [2, -1], [2, 0]]])
    out = kernels.sparse_attention(q, k, v, topk, 0.5)
    weights = torch.softmax(0.5 * (q[..., 3:, :] @ k[..., [0, 2], :].transpose(-1, -2)), -1)
    torch.testing.assert_close(out[..., 3:, :], weights @ v[..., [0, 2], :])
    torch.testing.assert_close(out[..., :3, :], v[..., :3, :])


# -- sizes, config checks, names, counts, FLOPs, export --------------------------------------------
def test_indexer_sizes_derive_from_heads_and_mla_sizes():
    config = small_config("D", hidden_size=64, num_attention_heads=4)  # d = 16
    assert (config.dsa_indexer_n_heads, config.dsa_indexer_head_dim) == (2, 16)
    assert config.dsa_indexer_topk == 2048 and config.qk_pos_emb_head_dim == 8
    assert small_config("D", num_attention_heads=1).dsa_indexer_n_heads == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dsa_indexer_head_dim=2), "dsa_indexer_head_dim=2 .* below qk_pos_emb_head_dim=4"),
        (dict(dsa_indexer_topk=0), "dsa_indexer_topk must be a positive number"),
        (dict(dsa_indexer_n_heads=0), "dsa_indexer_n_heads must be a positive number"),
        (dict(dsa_indexer_loss_coeff=-1.0), "dsa_indexer_loss_coeff .* finite number >= 0"),
        (dict(qk_pos_emb_head_dim=5), "qk_pos_emb_head_dim=5 .* must be even"),
    ],
)
def test_bad_indexer_sizes_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dsa_config("MD", **overrides)


def test_checkpoint_keys_are_megatrons_dsa_names():
    config = dsa_config("M[D-]", **MLA_OPTIONS)
    assert layer_keys(config, 1) == {
        "input_layernorm.weight",
        "self_attention.linear_q_down_proj.weight",
        "self_attention.q_layernorm.weight",
        "self_attention.linear_q_up_proj.weight",
        "self_attention.linear_kv_down_proj.weight",
        "self_attention.kv_layernorm.weight",
        "self_attention.linear_kv_up_proj.weight",
        "self_attention.linear_proj.weight",
        "self_attention.core_attention.indexer.linear_wq_b.weight",
        "self_attention.core_attention.indexer.linear_wk.weight",
        "self_attention.core_attention.indexer.k_norm.weight",
        "self_attention.core_attention.indexer.k_norm.bias",
        "self_attention.core_attention.indexer.linear_weights_proj.weight",
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_equals_the_built_model(variant):
    config = dsa_config("[D-]M+E", **VARIANTS[variant])
    assert parameter_count(config) == HybridModel(config).num_parameters()


def test_flops_hand_counted():
    # H 32, n 4, dn 6, dr 4, dv 5, rkv 10, no query latent; ni 4, di 6; T 16, K 3, loss on:
    config = dsa_config(dsa_indexer_loss_coeff=0.1)
    expected = (
        2 * 32 * 4 * 10  # linear_q_proj
        + 2 * 32 * (10 + 4)  # linear_kv_down_proj
        + 2 * 10 * 4 * (6 + 5)  # linear_kv_up_proj
        + 2 * 4 * 5 * 32  # linear_proj
        + 2 * 32 * 4 * 6  # indexer linear_wq_b (from x: no query latent)
        + 2 * 32 * 6  # indexer linear_wk
        + 2 * 32 * 4  # indexer linear_weights_proj
        + 2 * 16 * 4 * 6  # index scores over T keys
        + 2 * 3 * 4 * 10  # Q K^T over the K = 3 selected keys
        + 2 * 3 * 4 * 5  # scores @ V over them
        + 2 * 16 * 4 * 10  # the loss's dense target scores
    )
    assert layer_forward_flops_per_token(config, "D", 16) == expected


def test_hugging_face_export_refuses_dsa_naming_it():
    problems = export_problems(dsa_config("M[D-]+"))
    assert any("'D' (DeepSeek sparse attention)" in problem for problem in problems), problems
    assert any("'+' (MLA)" in problem for problem in problems), problems


# -- fused == unfused, training -------------------------------------------------------------------
def canonical_state(model):
    return {canonical_key(k, model.config.pattern): v for k, v in model.state_dict().items()}


FUSED, UNFUSED = "[DE]M[+-]", "DEM+-"
DSA_OPTIONS = dict(**MLA_OPTIONS, dsa_indexer_loss_coeff=0.1)


def test_fused_and_unfused_have_identical_canonical_parameters_and_logits():
    fused = HybridModel(dsa_config(FUSED, **DSA_OPTIONS), seed=7)
    unfused = HybridModel(dsa_config(UNFUSED, **DSA_OPTIONS), seed=7)
    fused_state, unfused_state = canonical_state(fused), canonical_state(unfused)
    assert fused_state.keys() == unfused_state.keys()
    assert all(torch.equal(fused_state[k], unfused_state[k]) for k in fused_state)
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The same ops on the same operands in both: equal up to 1e-6 (in fact bitwise).
        torch.testing.assert_close(
            perturb_parameters(fused, 3)(tokens),
            perturb_parameters(unfused, 3)(tokens),
            rtol=0,
            atol=1e-6,
        )


DSA_FLAGS = (
    "--q-lora-rank",
    "12",
    "--qk-layernorm",
    "--kv-lora-rank",
    "10",
    "--dsa-indexer-topk",
    "8",  # of 24 tokens: sparse
    "--dsa-indexer-loss-coeff",
    "0.1",
)


def test_fused_and_unfused_train_alike():
    common = ("--train-iters", "20", "--log-interval", "5", *DSA_FLAGS)
    fused = train("--hybrid-layer-pattern", FUSED, *common)
    unfused = train("--hybrid-layer-pattern", UNFUSED, *common)
    assert len(fused.losses) == len(unfused.losses) == 20
    # Identical ops on identical operands: rtol 1e-5 is the bound (measured: equal).
    assert fused.losses == pytest.approx(unfused.losses, rel=1e-5)
    assert fused.losses[-1] < fused.losses[0]


def test_the_indexer_learns_from_its_loss():
    # Gradient accumulation over two micro-batches scales the indexer loss like MoE's aux loss.
    config = dsa_config("D-", **DSA_OPTIONS, dsa_indexer_topk=4)
    model = HybridModel(config, seed=1).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "indexer" in n}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    model.set_aux_loss_grad_scale(0.5)
    for half in tokens.chunk(2):
        model(half[:, :-1], half[:, 1:]).mul(0.5).backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert model.decoder.layers["0"].sequence_mixer.core_attention.aux_loss_grad_scale == 0.5


@pytest.mark.slow
def test_the_default_run_trains_a_pattern_with_dsa():
    # The embedded default model and data with DSA (64 tokens, top 16 keys) and MLA.
    short_default_run(
        "[M-][DE]M[+-]", "--dsa-indexer-topk", "16", "--dsa-indexer-loss-coeff", "0.01"
    )


def test_a_later_token_does_not_change_the_keys_an_earlier_query_sees():
    # Many index scores are exactly 0 (every head's relu is 0); ties go to the earlier key,
    # whatever the sequence length (torch.topk's order among ties depends on it). Sequence
    # parallelism pads lengths tp does not divide, so this is also tp == one process.
    config = dsa_config("D-", **DSA_OPTIONS, dsa_indexer_n_heads=2, dsa_indexer_topk=4)
    model = perturb_parameters(HybridModel(config, seed=3), seed=1).eval()
    tokens = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The same per-row float32 math on a longer row: equal to a few ulps.
        torch.testing.assert_close(model(tokens[:, :13]), model(tokens)[:, :13])


def test_mla_and_dsa_run_forward_and_backward_under_bf16_autocast():
    # The CPU stand-in for `--bf16` on CUDA: GEMMs in bf16; scores and softmax in float32.
    model = HybridModel(dsa_config("[+-][DE]", **DSA_OPTIONS)).train()
    tokens = torch.randint(0, 64, (2, 13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
