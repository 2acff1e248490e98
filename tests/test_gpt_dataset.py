"""Training samples from indexed datasets: sample index, shuffling, splits, cache, resume,
data-parallel shares, and errors for data that does not fit."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from megatron_hybrid.data.builder import (
    DataConfigError,
    DataSettings,
    add_data_args,
    build_datasets,
    split_ranges,
)
from megatron_hybrid.data.gpt_dataset import GPTDataset, TooFewTokensError
from megatron_hybrid.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
)
from megatron_hybrid.data.sharding import DataParallelShare
from megatron_hybrid.data.tokenizer import ByteTokenizer, NullTokenizer
from megatron_hybrid.training.arguments import flags_to_settings

SEQ = 16


def write_dataset(prefix, num_sequences=60, dtype=np.int32, seed=0, eod=None) -> list[np.ndarray]:
    """Sequences of 1..40 tokens. Without `eod` every token of the file is distinct (a running
    count from 1), so a sample's tokens tell exactly where it was cut; with `eod` each sequence
    ends in it."""
    rng = np.random.default_rng(seed)
    sequences, next_token = [], 1
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for _ in range(num_sequences):
            n = int(rng.integers(1, 41))
            tokens = np.arange(next_token, next_token + n)
            next_token += n
            if eod is not None:
                tokens = rng.integers(0, eod, n)
                tokens[-1] = eod
            writer.add_document(tokens)
            sequences.append(tokens)
    return sequences


def data_args(*flags: str) -> DataSettings:
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    return flags_to_settings(DataSettings, parser.parse_args(list(flags)))


def build(*flags, tokenizer=None, seed=3, train=200, evals=20):
    return build_datasets(
        data_args(*flags), tokenizer or NullTokenizer(100_000), SEQ, seed, train, evals
    )


def epoch_stream(dataset: GPTDataset, sequences, epoch: int) -> np.ndarray:
    """The epoch's token stream: the split's sequences in the epoch's document order."""
    index = dataset.epoch_index(epoch)
    return np.concatenate([sequences[dataset.first_sequence + d] for d in index.document_index])


@pytest.fixture
def corpus(tmp_path):
    return tmp_path / "corpus", write_dataset(tmp_path / "corpus")


def test_a_sample_is_seq_length_plus_one_consecutive_tokens_of_the_shuffled_stream(corpus):
    prefix, sequences = corpus
    dataset = GPTDataset(IndexedDataset(prefix), 0, 60, SEQ, seed=1, split_name="train")
    stream, index = epoch_stream(dataset, sequences, 0), dataset.epoch_index(0)
    out = np.empty((dataset.samples_per_epoch, SEQ + 1), dtype=np.int64)
    dataset.read(np.arange(dataset.samples_per_epoch), out)
    for s, row in enumerate(out):
        window = int(index.shuffle_index[s])
        np.testing.assert_array_equal(row, stream[window * SEQ : window * SEQ + SEQ + 1])


def test_an_epoch_serves_every_window_of_its_stream_once(corpus):
    prefix, sequences = corpus
    dataset = GPTDataset(IndexedDataset(prefix), 0, 60, SEQ, seed=1, split_name="train")
    out = np.empty((dataset.samples_per_epoch, SEQ + 1), dtype=np.int64)
    dataset.read(np.arange(dataset.samples_per_epoch), out)
    stream = epoch_stream(dataset, sequences, 0)
    assert dataset.samples_per_epoch == (len(stream) - 1) // SEQ
    assert sorted(out[:, 0]) == sorted(stream[: dataset.samples_per_epoch * SEQ : SEQ])


def test_every_epoch_has_its_own_document_order(corpus):
    prefix, sequences = corpus
    dataset = GPTDataset(IndexedDataset(prefix), 0, 60, SEQ, seed=1, split_name="train")
    first, second = dataset.epoch_index(0), dataset.epoch_index(1)
    assert sorted(first.document_index) == sorted(second.document_index) == list(range(60))
    assert not np.array_equal(first.document_index, second.document_index)


def test_samples_run_across_document_boundaries_with_the_eod_between(tmp_path):
    write_dataset(tmp_path / "docs", eod=99)
    batch = build(
        "--data-path", str(tmp_path / "docs"), "--split", "1", tokenizer=NullTokenizer(99)
    ).train.batch(0, 32)
    interior = batch[:, 1:-1] == 99
    assert interior.any()  # an EOD inside a sample: the next document follows in the same sample
    assert batch.min() >= 0 and batch.max() <= 99


def test_batches_are_int64_of_seq_length_plus_one(corpus):
    batch = build("--data-path", str(corpus[0])).train.batch(5, 3)
    assert batch.dtype == torch.int64 and batch.shape == (3, SEQ + 1)


def test_the_sample_order_is_fixed_by_the_seed(corpus):
    a = build("--data-path", str(corpus[0]), seed=7).train.batch(0, 8)
    b = build("--data-path", str(corpus[0]), seed=7).train.batch(0, 8)
    c = build("--data-path", str(corpus[0]), seed=8).train.batch(0, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resuming_after_n_samples_continues_with_sample_n_plus_1(corpus):
    flags = ("--data-path", str(corpus[0]))
    uninterrupted = build(*flags, train=400).train
    expected = torch.cat([uninterrupted.batch(first, 4) for first in range(0, 120, 4)])
    # A run stops after 60 samples (it had asked for fewer samples in total); a fresh process
    # resumes from the 60 consumed samples, asking for more.
    before = build(*flags, train=100).train
    after = build(*flags, train=1000).train
    resumed = torch.cat(
        [before.batch(first, 4) for first in range(0, 60, 4)]
        + [after.batch(first, 4) for first in range(60, 120, 4)]
    )
    assert torch.equal(resumed, expected)


def test_the_index_is_cached_on_disk_and_reused(corpus, tmp_path, monkeypatch):
    flags = ("--data-path", str(corpus[0]), "--data-cache-path", str(tmp_path / "cache"))
    first = build(*flags).train.batch(0, 8)
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir())
    assert "train-epoch0-sample_index.npy" in cached and "description.json" in cached

    def no_building(self, epoch):
        raise AssertionError("the index should come from the cache")

    monkeypatch.setattr(GPTDataset, "build_epoch_index", no_building)
    assert torch.equal(build(*flags).train.batch(0, 8), first)


def test_the_index_cache_defaults_to_a_folder_next_to_the_data(corpus):
    build("--data-path", str(corpus[0]))
    assert any((corpus[0].parent / "index_cache").iterdir())


def test_splits_follow_megatrons_rounding():
    assert split_ranges((0.969, 0.03, 0.001), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges((0.9, 0.1, 0.0), 7) == [(0, 6), (6, 7), (7, 7)]


def test_train_and_valid_read_disjoint_sequences(corpus):
    prefix, sequences = corpus
    splits = build("--data-path", str(prefix), "--split", "80,20,0")
    train_tokens = set(np.concatenate(sequences[:48]).tolist())  # round(0.8 * 60) = 48
    assert set(splits.train.batch(0, 64).flatten().tolist()) <= train_tokens
    assert not set(splits.valid.batch(0, 16).flatten().tolist()) & train_tokens
    assert splits.test is None


def test_data_parallel_ranks_read_disjoint_shares_of_the_global_batch(corpus):
    train = build("--data-path", str(corpus[0])).train
    whole = train.batch(8, 8)  # global samples 8..15: one iteration of 2 ranks x 2 x 2
    shares = [
        torch.cat(
            [
                train.batch(first, count)
                for first, count in DataParallelShare(rank, 2).training_reads(8, 2, 2)
            ]
        )
        for rank in range(2)
    ]
    assert torch.equal(shares[0], torch.cat([whole[0:2], whole[4:6]]))
    assert torch.equal(shares[1], torch.cat([whole[2:4], whole[6:8]]))


def test_without_data_flags_there_are_no_datasets():
    assert build() is None


def test_mock_data_gives_documents_of_the_tokenizers_ids():
    splits = build("--mock-data", tokenizer=ByteTokenizer())
    batch = splits.train.batch(0, 16)
    assert batch.max() <= 256 and (batch == 256).any()  # EOD between documents
    assert len(batch.unique()) > 50
    assert splits.valid is not None and splits.test is not None


# -- errors ----------------------------------------------------------------------------------------


def test_a_missing_dataset_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.idx does not exist"):
        build("--data-path", str(tmp_path / "nowhere"))


def test_ids_beyond_the_tokenizers_vocabulary_name_the_file(tmp_path):
    write_dataset(tmp_path / "gpt2", dtype=np.uint16)  # ids up to ~1200
    with pytest.raises(
        IndexedDatasetError,
        match=r"gpt2\.bin holds token id \d+ .*outside the ids 0\.\.256 of the "
        r"tokenizer ByteTokenizer",
    ):
        build("--data-path", str(tmp_path / "gpt2"), tokenizer=ByteTokenizer())


def test_a_dtype_too_narrow_for_the_tokenizer_names_the_file(tmp_path):
    write_dataset(tmp_path / "bytes", dtype=np.uint16)
    with pytest.raises(
        IndexedDatasetError,
        match=r"bytes\.bin stores uint16 tokens \(ids up to 65535\), but the "
        r"tokenizer NullTokenizer\(100000\) has 100001 ids",
    ):
        build("--data-path", str(tmp_path / "bytes"))


def test_float_data_is_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "floats", np.float32) as writer:
        writer.add_document(np.linspace(0.5, 3.5, 50))
    with pytest.raises(IndexedDatasetError, match=r"floats\.bin holds float32 values"):
        build("--data-path", str(tmp_path / "floats"))


@pytest.mark.parametrize("split", ["90,x", "1,2,3,4", "0,0,0", "-1,2"])
def test_a_split_that_does_not_parse_is_named(corpus, split):
    with pytest.raises(DataConfigError, match=rf"--split '{split}': expected"):
        build("--data-path", str(corpus[0]), f"--split={split}")


def test_a_train_split_too_short_for_one_sample_names_the_file(tmp_path):
    with IndexedDatasetWriter(tmp_path / "tiny", np.int32) as writer:
        writer.add_document(np.arange(1, 11))
    with pytest.raises(
        TooFewTokensError,
        match=r"train split of .*tiny .* has 10 tokens, too few "
        r"for one sample of seq_length \+ 1 = 17",
    ):
        build("--data-path", str(tmp_path / "tiny"))


def test_a_valid_split_too_short_for_one_sample_is_left_out(tmp_path):
    with IndexedDatasetWriter(tmp_path / "short", np.int32) as writer:
        for i in range(20):
            writer.add_document(np.arange(1, 11) + 10 * i)
    splits = build("--data-path", str(tmp_path / "short"), "--split", "19,1,0")  # valid: 10 tokens
    assert splits.train is not None and splits.valid is None


def test_two_data_sources_at_once_are_refused(corpus):
    with pytest.raises(DataConfigError, match="give one data source"):
        build("--data-path", str(corpus[0]), "--mock-data")


def test_data_rewritten_in_place_gets_a_fresh_index(tmp_path):
    """Same file sizes, other sequence boundaries: the cached index of the old data must not
    be reused."""
    tokens, flags = np.arange(1, 601), ("--data-path", str(tmp_path / "corpus"))
    for boundaries in ([100, 350], [250, 300]):
        with IndexedDatasetWriter(tmp_path / "corpus", np.int32) as writer:
            for piece in np.split(tokens, boundaries):
                writer.add_document(piece)
        splits = build(*flags, "--split", "1")
    assert len(list((tmp_path / "index_cache").glob("*-description.json"))) == 2
    dataset, sequences = splits.train.dataset, np.split(tokens, [250, 300])
    stream = epoch_stream(dataset, sequences, 0)
    window = int(dataset.epoch_index(0).shuffle_index[0])
    expected = stream[window * SEQ : window * SEQ + SEQ + 1]
    assert splits.train.batch(0, 1)[0].tolist() == expected.tolist()
