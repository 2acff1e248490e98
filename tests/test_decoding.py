"""Decoding with state (megatron_hybrid/layers/decoding.py): every sequence mixer's prefill over
right-padded prompts and its one-token steps reproduce its forward over the whole, unpadded
sequences; a model's prefill + decode_step reproduce its logits.

Float64 with random weights: prefill and steps evaluate the same functions as the forward in
another order (per-token recurrences against the chunked scan, masked attention over a cache
against causal attention), which agree to ~1e-15 relative per operation; 1e-10 has orders of
magnitude of margin and still fails on any wrong term (a position off by one, a stale state,
padding leaking into a state: errors of order 1e-2 or more at these weight scales).
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_parameters, small_config

from megatron_hybrid.layers.decoding import DecodingMixer
from megatron_hybrid.model import HybridModel
from megatron_hybrid.specs import SPECS
from megatron_hybrid.specs.base import SEQUENCE

F64 = dict(rtol=1e-10, atol=1e-10)
LENGTHS = [13, 5, 9]  # right-padded to 13: two rows with padding, one spanning two SSD chunks
NEW = 6  # positions decoded one at a time after each prompt
SEQUENCE_SYMBOLS = sorted(s for s, spec in SPECS.items() if spec.kind == SEQUENCE)
# Each sequence mixer in the settings that change its decoding: rope or not, MLA's query latent,
# latent norms and YaRN, and for D a top-k smaller than the context, so that the indexer chooses.
_YARN = dict(
    rope_type="yarn",
    rotary_scaling_factor=4.0,
    original_max_position_embeddings=8,
    beta_fast=4.0,
    mscale=0.9,
    mscale_all_dim=0.6,
)
VARIANTS = {
    "*": {"rope": dict(position_embedding_type="rope"), "no-rope": {}},
    "+": {
        "rope": dict(rope_type="rope"),
        "q-latent-yarn": dict(q_lora_rank=12, qk_layernorm=True, **_YARN),
    },
    "D": {
        "top4": dict(dsa_indexer_topk=4, rope_type="rope"),
        "top4-q-latent-yarn": dict(dsa_indexer_topk=4, q_lora_rank=12, qk_layernorm=True, **_YARN),
    },
}


def mixer_cases() -> list:
    # A list, not a generator: pytest 10 takes only collections in parametrize.
    return [
        pytest.param(symbol, overrides, id=f"{symbol}-{label}" if label else symbol)
        for symbol in SEQUENCE_SYMBOLS
        for label, overrides in VARIANTS.get(symbol, {"": {}}).items()
    ]


def random_mixer(symbol: str, overrides: dict) -> torch.nn.Module:
    """The mixer of a one-layer model (so initialized by its spec's rules), moved off its
    structured initial values (norm weights and D of one)."""
    model = perturb_parameters(HybridModel(small_config(symbol, **overrides), seed=0))
    return model.decoder.layers["0"].sequence_mixer.double().eval()


def sequences(hidden: int, total: int):
    """Row b: LENGTHS[b] + NEW positions of random input."""
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randn(length + NEW, hidden, generator=generator, dtype=torch.float64)
        for length in LENGTHS
    ][:total]


def right_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """The rows' first positions stacked, right-padded with random values (which must not
    matter) to `width`."""
    generator = torch.Generator().manual_seed(2)
    padded = torch.randn(len(rows), width, rows[0].shape[-1], generator=generator).double()
    for b, (row, length) in enumerate(zip(rows, LENGTHS, strict=False)):
        padded[b, :length] = row[:length]
    return padded


@pytest.mark.parametrize("symbol,overrides", mixer_cases())
@torch.no_grad()
def test_sequence_mixer_prefill_and_steps_reproduce_its_forward(symbol, overrides):
    mixer = random_mixer(symbol, overrides)
    assert isinstance(mixer, DecodingMixer), f"{symbol!r}'s mixer has no prefill/step"
    rows = sequences(small_config(symbol).hidden_size, len(LENGTHS))
    expected = [mixer(row.unsqueeze(0))[0] for row in rows]  # each row alone, unpadded
    lengths = torch.tensor(LENGTHS)
    prompt = right_padded(rows, max(LENGTHS))
    y, state = mixer.prefill(prompt, lengths, capacity=max(LENGTHS) + NEW)
    for b, length in enumerate(LENGTHS):
        torch.testing.assert_close(y[b, :length], expected[b][:length], **F64)
    for i in range(NEW):
        x_B1H = torch.stack(
            [row[length + i] for row, length in zip(rows, LENGTHS, strict=True)]
        ).unsqueeze(1)
        y_B1H = mixer.step(x_B1H, state)
        for b, length in enumerate(LENGTHS):
            torch.testing.assert_close(y_B1H[b, 0], expected[b][length + i], **F64)
    # Outputs worth comparing: orders of magnitude above the 1e-10 tolerance.
    assert max(e.abs().max() for e in expected) > 1e-2


@torch.no_grad()
def test_a_full_kv_cache_says_how_to_make_room():
    mixer = random_mixer("*", {})
    x = torch.randn(1, 4, mixer.linear_qkv.in_features, dtype=torch.float64)
    _, cache = mixer.prefill(x, torch.tensor([4]), capacity=5)
    mixer.step(x[:, :1], cache)
    with pytest.raises(ValueError, match="KV cache full: all 5 positions.*larger capacity"):
        mixer.step(x[:, :1], cache)


# Every mixer (`*` and MLA's `+`/`D` may not share a model), fusion groups with both sides, a
# channel-only block, rope; D choosing 4 keys of up to 19.
MODELS = {
    "M*-E": ("[M-]M*E[*-]-[ME]", dict(position_embedding_type="rope")),
    "G+D": ("[G-]M+E[DE]-[M-]", dict(rope_type="rope", dsa_indexer_topk=4)),
}


@pytest.mark.parametrize("pattern,overrides", MODELS.values(), ids=MODELS.keys())
@torch.no_grad()
def test_model_prefill_and_decode_steps_reproduce_its_logits(pattern, overrides):
    config = small_config(pattern, **overrides)
    model = perturb_parameters(HybridModel(config, seed=3)).double().eval()
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, config.vocab_size, (n + NEW,), generator=generator) for n in LENGTHS]
    expected = [model(row.unsqueeze(0))[0] for row in rows]
    prompt = torch.zeros(len(rows), max(LENGTHS), dtype=torch.long)
    for b, length in enumerate(LENGTHS):
        prompt[b, :length] = rows[b][:length]
    lengths = torch.tensor(LENGTHS)
    logits, states = model.prefill(prompt, lengths, capacity=max(LENGTHS) + NEW)
    assert set(states) == set(model.decoder.layers)
    assert states["5"] is None  # the channel-only block "-"
    assert all(states[p] is not None for p in ("0", "1", "2", "4"))
    for i in range(NEW):
        for b, length in enumerate(LENGTHS):
            torch.testing.assert_close(logits[b], expected[b][length - 1 + i], **F64)
        logits = model.decode_step(
            torch.stack([row[length + i] for row, length in zip(rows, LENGTHS, strict=True)]),
            states,
        )


def test_a_pipeline_stage_cannot_prefill():
    from megatron_hybrid.model import StageSpec

    config = small_config("M-M-")
    stage = HybridModel(config, stage=StageSpec((0, 1), first=True, last=False))
    with pytest.raises(ValueError, match=r"whole model in one process.*blocks \(0, 1\)"):
        stage.prefill(torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]), 4)
