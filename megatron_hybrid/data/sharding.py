"""Which global samples each data-parallel rank reads: the one rule, for training and evaluation.

Sample sources (data/builder.py's `DataSplit`, data/sampler.py's `StreamSampler`) serve global
samples: `source.batch(first, count)` is samples first .. first + count - 1. A rank reads the
(first, count) ranges `DataParallelShare` gives it:

    training, micro-batch size b, d ranks: micro-step j of the iteration that starts after
        `consumed` samples covers global samples consumed + j*d*b .. consumed + (j+1)*d*b - 1,
        and rank r reads its contiguous b of them: first = consumed + (j*d + r)*b.
        So an iteration reads the same global batch under every layout, and a resumed run
        continues at its consumed-sample count.
    evaluation: rank r reads the contiguous block r*n .. (r+1)*n - 1 of a fixed set of d*n
        samples, in reads of the evaluation batch. A validation set may hold fewer samples than
        asked for; contiguous blocks keep it to the first d*n samples under every layout (the
        last read of a block may be short), so the loss is that of the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataParallelShare:
    """The samples data-parallel rank `rank` of `size` ranks reads (see the module docstring)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"data-parallel rank {self.rank} is outside 0..{self.size - 1}")

    def training_reads(
        self, consumed: int, micro_batches: int, micro_batch_size: int
    ) -> list[tuple[int, int]]:
        """(first global sample, count) of each of this rank's micro-batches in the iteration
        that starts after `consumed` global samples."""
        return [
            (consumed + (micro * self.size + self.rank) * micro_batch_size, micro_batch_size)
            for micro in range(micro_batches)
        ]

    def evaluation_reads(
        self, available: int, wanted_per_rank: int, read_size: int, whole_reads: bool = False
    ) -> list[tuple[int, int]]:
        """(first global sample, count) of each of this rank's reads of a fixed evaluation set
        of `available` samples: `wanted_per_rank` samples per rank, or the rank's equal share
        of the set when that is smaller, in reads of `read_size`. `whole_reads` (a pipeline runs
        whole batches only) rounds the share down to whole reads, but to at least one."""
        per_rank = min(wanted_per_rank, available // self.size)
        if whole_reads:
            per_rank = max(per_rank // read_size, 1) * read_size
        first = self.rank * per_rank
        return [
            (first + offset, min(read_size, per_rank - offset))
            for offset in range(0, per_rank, read_size)
        ]
