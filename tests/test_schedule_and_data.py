"""Learning-rate schedule, byte tokenizer, embedded corpus and the resumable sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import small_config

from megatron_hybrid.data.embedded import embedded_token_streams
from megatron_hybrid.data.sampler import StreamSampler
from megatron_hybrid.data.tokenizer import ByteTokenizer
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.optimizer import LRSchedule, build_optimizer


def test_warmup_is_linear_then_cosine_reaches_min_lr():
    s = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="cosine")
    assert s(1) == pytest.approx(0.1) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_linear_and_constant_decay():
    linear = LRSchedule(1.0, 0.0, 0, 100, "linear")
    assert linear(25) == pytest.approx(0.75)
    assert LRSchedule(1.0, 0.0, 5, 100, "constant")(80) == 1.0


def test_inverse_square_root_decay_never_drops_below_min_lr():
    s = LRSchedule(1.0, 0.2, 4, 100, "inverse-square-root")
    assert s(16) == pytest.approx(0.5) and s(10_000) == 0.2


def test_matrices_decay_and_vectors_do_not():
    model = HybridModel(small_config("M-"))
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    decay, no_decay = opt.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_byte_tokenizer_round_trips_utf8_text():
    tok = ByteTokenizer()
    text = "naïve café — ∑ x²"
    ids = tok.encode(text)
    assert ids.max() < 256 and tok.decode(ids) == text
    assert tok.decode([104, 105, tok.eod, 300]) == "hi\n"


def test_embedded_corpus_has_disjoint_train_and_validation_documents():
    train, valid = embedded_token_streams(ByteTokenizer())
    assert len(train) > 300_000 and len(valid) > 10_000
    assert (train == ByteTokenizer.eod).sum() > 50
    assert bytes(valid[:200].astype(np.uint8)) not in bytes(train.astype(np.uint8))


def test_sampler_windows_are_consecutive_tokens_of_the_stream():
    tokens = np.arange(1000)
    sampler = StreamSampler(tokens, seq_length=16, seed=0)
    for i in range(0, 200, 7):
        window = sampler.sample(i)
        assert window.shape == (17,)
        assert torch.equal(window, torch.arange(int(window[0]), int(window[0]) + 17))


def test_sampler_order_is_a_function_of_seed_and_index():
    tokens = np.random.default_rng(0).integers(0, 256, 5000)
    a, b = StreamSampler(tokens, 32, seed=5), StreamSampler(tokens, 32, seed=5)
    late = a.sample(400)  # epoch 2, computed first by a fresh sampler: resuming at 400
    assert torch.equal(torch.stack([b.sample(i) for i in range(401)])[-1], late)
    assert not torch.equal(StreamSampler(tokens, 32, seed=6).batch(0, 8), a.batch(0, 8))


def test_one_epoch_visits_every_window_once():
    sampler = StreamSampler(np.arange(10_000), seq_length=50, seed=1)
    starts = {int(sampler.sample(i)[0]) for i in range(sampler.samples_per_epoch)}
    assert len(starts) == sampler.samples_per_epoch
    assert len({s % 50 for s in starts}) == 1  # one offset per epoch


def test_too_short_stream_is_a_clear_error():
    with pytest.raises(ValueError, match="too few for one sample"):
        StreamSampler(np.arange(10), seq_length=16, seed=0)


def test_validation_sampler_is_not_shuffled():
    sampler = StreamSampler(np.arange(1000), seq_length=10, seed=3, shuffle=False)
    assert [int(sampler.sample(i)[0]) for i in range(3)] == [0, 10, 20]
    assert math.isclose(sampler.samples_per_epoch, 98)
