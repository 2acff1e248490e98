"""One rule decides which global samples each data-parallel rank reads (data/sharding.py):
training reads micro-step-major slices of the global batch, evaluation contiguous blocks of a
fixed set; both leave every sample to exactly one rank."""

from __future__ import annotations

import pytest

from megatron_hybrid.data.sharding import DataParallelShare


def sample_ids(reads: list[tuple[int, int]]) -> list[int]:
    return [first + k for first, count in reads for k in range(count)]


def test_training_micro_step_j_gives_rank_r_the_slice_j_times_ranks_plus_r():
    # The trainer's indexing since the first data-parallel run: consumed + (j*d + r)*b, which
    # checkpoints (consumed-sample counts) and the layout parity tests rely on.
    assert DataParallelShare(0, 2).training_reads(10, 2, 3) == [(10, 3), (16, 3)]
    assert DataParallelShare(1, 2).training_reads(10, 2, 3) == [(13, 3), (19, 3)]
    assert DataParallelShare().training_reads(8, 3, 2) == [(8, 2), (10, 2), (12, 2)]


@pytest.mark.parametrize(
    "ranks,micro_batches,micro_batch_size", [(1, 1, 4), (2, 3, 2), (4, 2, 1), (3, 1, 5)]
)
def test_the_ranks_of_an_iteration_read_its_global_batch_once(
    ranks, micro_batches, micro_batch_size
):
    consumed = 40
    read = sorted(
        i
        for r in range(ranks)
        for i in sample_ids(
            DataParallelShare(r, ranks).training_reads(consumed, micro_batches, micro_batch_size)
        )
    )
    assert read == list(range(consumed, consumed + ranks * micro_batches * micro_batch_size))


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_evaluation_reads_the_first_samples_once_in_contiguous_blocks(ranks):
    per_rank = 12
    blocks = [
        sample_ids(DataParallelShare(r, ranks).evaluation_reads(1000, per_rank, 5))
        for r in range(ranks)
    ]
    assert [b for block in blocks for b in block] == list(range(ranks * per_rank))
    assert all(
        count <= 5
        for r in range(ranks)
        for _, count in DataParallelShare(r, ranks).evaluation_reads(1000, per_rank, 5)
    )


def test_a_small_evaluation_set_is_shared_equally_with_a_short_last_read():
    assert DataParallelShare(1, 2).evaluation_reads(23, 100, 4) == [(11, 4), (15, 4), (19, 3)]


def test_a_pipeline_evaluates_whole_batches_and_at_least_one():
    assert DataParallelShare(1, 2).evaluation_reads(23, 100, 4, whole_reads=True) == [
        (8, 4),
        (12, 4),
    ]
    assert DataParallelShare(0, 2).evaluation_reads(5, 100, 4, whole_reads=True) == [(0, 4)]


def test_a_rank_outside_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="data-parallel rank 2 is outside 0..1"):
        DataParallelShare(2, 2)
