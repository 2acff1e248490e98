"""Generation with state (megatron_hybrid/generation.py): greedy tokens from the state cache
equal full recomputation; sampling honours temperature, top-k, top-p and its seed; bad input is
named."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb_parameters, small_config

from megatron_hybrid.generation import GREEDY, Sampling, generate, next_tokens
from megatron_hybrid.model import HybridModel

# Every implemented mixer, fusion groups of both kinds, a channel-only block; rope on, so the
# cache's positions matter. Prompts of different lengths across SSD chunks of 8.
PATTERN = "[M-]M*E[*-]-[ME]"
PROMPT_LENGTHS = (21, 3, 12)
NEW_TOKENS = 64


def random_model(kernels=None, pattern=PATTERN, **overrides) -> HybridModel:
    overrides = {"position_embedding_type": "rope", **overrides}
    config = small_config(pattern, vocab_size=96, **overrides)
    return perturb_parameters(HybridModel(config, seed=7, kernels=kernels)).eval()


def random_prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


@torch.no_grad()
def greedy_by_recomputation(model: HybridModel, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The reference: the whole context through the model for every new token."""
    tokens = prompt.clone()
    for _ in range(new):
        next_id = model(tokens.unsqueeze(0))[0, -1].argmax()
        tokens = torch.cat([tokens, next_id.view(1)])
    return tokens[prompt.numel() :]


# The mixers `*` cannot share a model with: Gated DeltaNet, MLA and DSA choosing 4 keys.
OTHER_MIXERS = ("[G-]M+E[DE]-[M-]", dict(rope_type="rope", dsa_indexer_topk=4))


@pytest.mark.parametrize(
    "pattern,overrides",
    [(PATTERN, dict(position_embedding_type="rope")), OTHER_MIXERS],
    ids=["M*-E", "G+D"],
)
def test_greedy_with_the_state_cache_equals_full_recomputation(pattern, overrides):
    # float32 on CPU: the cache and recomputation round differently (~1e-6 of the logits), which
    # changes an argmax only at a near-tie; these seeds have none within 64 tokens.
    model = random_model(pattern=pattern, **overrides)
    prompts = random_prompts(model.config.vocab_size)
    cached = generate(model, prompts, NEW_TOKENS, GREEDY)
    assert [len(c) for c in cached] == [NEW_TOKENS] * len(prompts)
    for prompt, tokens in zip(prompts, cached, strict=True):
        torch.testing.assert_close(tokens, greedy_by_recomputation(model, prompt, NEW_TOKENS))
    assert len({tuple(t.tolist()) for t in cached}) == len(prompts)  # rows really differ


@pytest.mark.gpu
def test_greedy_on_cuda_with_triton_kernels_equals_eager_on_cpu():
    # float32 both (the Triton kernels' float32 matmuls are IEEE, torch's matmuls do not use
    # TF32 by default): logits agree to ~1e-6, so the argmax agrees but at a near-tie.
    from megatron_hybrid.kernels.registry import resolve_kernels

    kernels = resolve_kernels({}, "auto", "cuda")
    assert kernels.impl("ssd_step") == "triton" and kernels.impl("causal_conv1d_step") == "triton"
    model = random_model()
    prompts = random_prompts(model.config.vocab_size)
    on_gpu = random_model(kernels).cuda()
    expected = generate(model, prompts, 32, GREEDY)
    for ours, theirs in zip(generate(on_gpu, prompts, 32, GREEDY), expected, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_a_model_with_mtp_depths_generates_from_its_main_head():
    model = random_model(pattern="M*E/M-")
    assert model.mtp is not None
    (prompt,) = random_prompts(model.config.vocab_size, lengths=(9,))
    (tokens,) = generate(model, [prompt], 16, GREEDY)
    torch.testing.assert_close(tokens, greedy_by_recomputation(model, prompt, 16))


def test_a_prompt_decodes_the_same_alone_and_in_a_batch():
    model = random_model()
    prompts = random_prompts(model.config.vocab_size)
    batch = generate(model, prompts, 16, GREEDY)
    alone = [generate(model, [p], 16, GREEDY)[0] for p in prompts]
    for a, b in zip(alone, batch, strict=True):
        torch.testing.assert_close(a, b)


def test_sampling_is_seeded_and_stays_in_the_vocabulary_limit():
    model = random_model()
    prompts = random_prompts(model.config.vocab_size, lengths=(5, 9))
    sampling = Sampling(temperature=1.5, seed=3)
    first = generate(model, prompts, 24, sampling, vocab_limit=50)
    again = generate(model, prompts, 24, sampling, vocab_limit=50)
    other = generate(model, prompts, 24, Sampling(temperature=1.5, seed=4), vocab_limit=50)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert max(int(t.max()) for t in first + other) < 50
    assert model.training is False


def test_generation_puts_the_model_back_in_its_mode():
    model = random_model().train()
    generate(model, [torch.tensor([1, 2, 3])], 2)
    assert model.training


def test_a_stop_id_ends_a_row_after_it():
    model = random_model()
    prompts = random_prompts(model.config.vocab_size)
    full = generate(model, prompts, 12, GREEDY)
    stop = int(full[0][4])  # row 0's fifth token
    stopped = generate(model, prompts, 12, GREEDY, stop_id=stop)
    for tokens, row in zip(full, stopped, strict=True):
        hits = (tokens == stop).nonzero()
        end = int(hits[0]) + 1 if hits.numel() else len(tokens)
        torch.testing.assert_close(row, tokens[:end])


# -- the sampling rule on fixed logits ----------------------------------------------------------
LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
DRAWS = 20000


def frequencies(sampling: Sampling, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([next_tokens(logits.expand(DRAWS, -1), sampling, generator)])
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / DRAWS


def assert_frequencies(observed: torch.Tensor, expected: list[float]) -> None:
    # 20000 draws: a frequency's standard error is at most 0.0036; 0.015 is over 4 of them.
    torch.testing.assert_close(
        observed, torch.tensor(expected, dtype=torch.float64), atol=0.015, rtol=0
    )


def test_temperature_one_draws_the_softmax():
    assert_frequencies(frequencies(Sampling()), [0.5, 0.3, 0.15, 0.05])


def test_temperature_sharpens_the_distribution():
    # p^(1/T) renormalized, T = 0.5: squares.
    squares = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert_frequencies(frequencies(Sampling(temperature=0.5)), (squares / squares.sum()).tolist())


def test_top_k_keeps_the_k_most_likely():
    assert_frequencies(frequencies(Sampling(top_k=2)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 < 0.7 <= 0.5 + 0.3: the two most likely tokens.
    assert_frequencies(frequencies(Sampling(top_p=0.7)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    # p below the most likely token's probability keeps that token alone.
    assert_frequencies(frequencies(Sampling(top_p=0.2)), [1, 0, 0, 0])
    # top_k first, then top_p over what it left, renormalized (0.625, 0.375): 0.625 >= 0.6
    # keeps one token where top_p alone keeps two.
    assert_frequencies(frequencies(Sampling(top_k=2, top_p=0.6)), [1, 0, 0, 0])


def test_greedy_takes_the_argmax_per_row():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 0.0]])
    assert next_tokens(logits, GREEDY, None).tolist() == [1, 0]


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=math.inf), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**fields)


def test_bad_prompts_are_named():
    model = random_model()
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match=r"prompt 0 holds token ids outside .* 0\.\.95 .*max 96"):
        generate(model, [[1, 96]], 4)


def test_non_finite_logits_are_an_error():
    model = random_model()
    with torch.no_grad():
        model.output_weight().fill_(math.nan)
    with pytest.raises(ValueError, match="NaN or infinite"):
        generate(model, [[1, 2, 3]], 3)
