"""Blending datasets by weight: --data-path parsing, the schedule, and blended training data."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from megatron_hybrid.data.blended_dataset import BlendedDataset
from megatron_hybrid.data.builder import (
    DataConfigError,
    DataSettings,
    add_data_args,
    build_datasets,
    parse_blend,
)
from megatron_hybrid.data.indexed_dataset import IndexedDatasetWriter
from megatron_hybrid.data.tokenizer import NullTokenizer
from megatron_hybrid.training.arguments import flags_to_settings

SEQ = 16


def test_weighted_prefixes_parse_into_pairs():
    assert parse_blend(["0.3", "A", "0.7", "B"]) == [(0.3, "A"), (0.7, "B")]
    assert parse_blend(["1e-1", "A"]) == [(0.1, "A")]


def test_prefixes_without_weights_parse_with_no_weight():
    assert parse_blend(["A", "B"]) == [(None, "A"), (None, "B")]


@pytest.mark.parametrize(
    "values, message",
    [
        (["0.3", "A", "0.7"], "the last weight '0.7' has no prefix after it"),
        (["A", "0.7", "B"], "'0.7' looks like a weight, but 'A' has none"),
        (["0.3", "A", "x", "B"], "expected a weight before 'B', found 'x'"),
        (
            ["0.3", "0.7", "A", "B"],
            "expected a dataset prefix after weight 0.3, found another number",
        ),
        (["-0.3", "A", "0.7", "B"], "weight -0.3 of A must be >= 0"),
        (["0", "A", "0", "B"], "the weights sum to 0"),
    ],
)
def test_blend_weights_that_do_not_parse_are_named(values, message):
    with pytest.raises(DataConfigError, match=r"--data-path .*" + message.replace("(", r"\(")):
        parse_blend(values)


def cumulative_counts(dataset_ids: np.ndarray, num_datasets: int) -> np.ndarray:
    return np.cumsum(np.eye(num_datasets, dtype=np.int64)[dataset_ids], axis=0)


@pytest.mark.parametrize(
    "weights", [(0.5, 0.3, 0.2), (1, 1, 1), (0.01, 0.99), (0.1, 0.4, 0.2, 0.25, 0.05)]
)
def test_after_every_sample_each_dataset_has_served_its_share_within_one(weights):
    blend = BlendedDataset([None] * len(weights), list(weights), window=256)
    n = 5000  # about 20 windows
    dataset_ids, _ = blend.assign(np.arange(n))
    expected = np.arange(1, n + 1)[:, None] * blend.weights[None, :]
    assert np.abs(cumulative_counts(dataset_ids, len(weights)) - expected).max() <= 1.0


def test_each_dataset_serves_its_own_samples_in_order():
    blend = BlendedDataset([None] * 3, [0.5, 0.3, 0.2], window=256)
    dataset_ids, inner_ids = blend.assign(np.arange(3000))
    for j in range(3):
        np.testing.assert_array_equal(
            inner_ids[dataset_ids == j], np.arange((dataset_ids == j).sum())
        )


def test_the_blend_of_any_sample_is_the_same_in_every_run_and_any_order():
    weights = [0.2, 0.5, 0.3]
    sequential = BlendedDataset([None] * 3, weights, window=256).assign(np.arange(4000))
    scattered = np.random.default_rng(0).permutation(4000)
    fresh = BlendedDataset([None] * 3, weights, window=256).assign(scattered)
    for a, b in zip(sequential, fresh, strict=True):
        np.testing.assert_array_equal(a[scattered], b)


def test_samples_needed_counts_each_datasets_share_of_a_prefix():
    blend = BlendedDataset([None] * 2, [0.25, 0.75], window=64)
    dataset_ids, _ = blend.assign(np.arange(1001))
    assert blend.samples_needed(1001) == np.bincount(dataset_ids).tolist()


# -- blended training data -------------------------------------------------------------------------


def write_constant_source(prefix, marker: int, num_sequences=40) -> None:
    """Sequences whose ids all lie in [marker, marker + 100): a sample tells its source."""
    rng = np.random.default_rng(marker)
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for _ in range(num_sequences):
            writer.add_document(marker + rng.integers(0, 100, int(rng.integers(5, 40))))


@pytest.fixture
def sources(tmp_path):
    write_constant_source(tmp_path / "a", 1000)
    write_constant_source(tmp_path / "b", 2000, num_sequences=80)
    return str(tmp_path / "a"), str(tmp_path / "b")


def build(*flags, train=1000, seed=5):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    return build_datasets(
        flags_to_settings(DataSettings, parser.parse_args(list(flags))),
        NullTokenizer(10_000),
        SEQ,
        seed,
        train,
        40,
    )


def source_fractions(batch: torch.Tensor) -> float:
    """Fraction of samples that came from dataset b."""
    return float((batch[:, 0] >= 2000).float().mean())


def test_blended_training_data_follows_the_weights(sources):
    a, b = sources
    batch = build("--data-path", "0.25", a, "0.75", b).train.batch(0, 400)
    assert source_fractions(batch) == pytest.approx(0.75, abs=1 / 400)
    assert ((batch < 2000).all(dim=1) | (batch >= 2000).all(dim=1)).all()  # one source a sample


def test_prefixes_without_weights_mix_by_token_count(sources):
    splits = build("--data-path", *sources)
    tokens = [d.num_tokens for d in splits.train.dataset.datasets]
    expected = tokens[1] / sum(tokens)
    assert source_fractions(splits.train.batch(0, 400)) == pytest.approx(expected, abs=1 / 400)


def test_a_blended_run_is_identical_across_runs_with_one_seed(sources):
    flags = ("--data-path", "0.4", sources[0], "0.6", sources[1])
    assert torch.equal(build(*flags).train.batch(0, 64), build(*flags).train.batch(0, 64))
    assert not torch.equal(
        build(*flags).train.batch(0, 64), build(*flags, seed=6).train.batch(0, 64)
    )


def test_a_resumed_blended_run_continues_with_the_next_sample(sources):
    flags = ("--data-path", "0.4", sources[0], "0.6", sources[1])
    uninterrupted = build(*flags).train
    expected = torch.cat([uninterrupted.batch(first, 8) for first in range(0, 96, 8)])
    resumed = build(*flags, train=5000).train  # a fresh process, asking for a longer run
    assert torch.equal(resumed.batch(48, 48), expected[48:])


def test_per_split_data_paths_use_each_dataset_whole(sources):
    a, b = sources
    splits = build("--train-data-path", "0.5", a, "0.5", b, "--valid-data-path", b)
    assert [d.num_tokens for d in splits.train.dataset.datasets] == [
        build("--data-path", a, "--split", "1").train.dataset.num_tokens,
        build("--data-path", b, "--split", "1").train.dataset.num_tokens,
    ]
    assert (splits.valid.batch(0, 16) >= 2000).all() and splits.test is None


def test_a_zero_weight_leaves_a_dataset_out(sources):
    batch = build("--data-path", "0", sources[0], "1", sources[1]).train.batch(0, 64)
    assert (batch >= 2000).all()
