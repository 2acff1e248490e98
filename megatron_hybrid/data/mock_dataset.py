"""`--mock-data`: a synthetic stand-in for an indexed dataset, generated on the fly.

It has the reader's interface (`sequence_lengths`, `get`, `gather`, `prefix`), so mock runs
exercise the same sample index, blending and sharding code as real data. Sequence i is an
arithmetic progression of token ids with a start and stride drawn from i, ending in EOD: not
random noise, so a model's loss falls quickly, which makes mock runs useful smoke tests.
"""

from __future__ import annotations

import numpy as np


class MockIndexedDataset:
    prefix = "mock"
    num_sequences = 16_384

    def __init__(self, vocab_size: int, eod: int, max_sequence_length: int, seed: int = 0):
        if vocab_size < 2:
            raise ValueError(f"mock data needs a vocabulary of at least 2 tokens, got {vocab_size}")
        self.vocab_size, self.eod = vocab_size, eod
        rng = np.random.RandomState(seed)
        self.sequence_lengths = rng.randint(
            1, max_sequence_length + 1, size=self.num_sequences, dtype=np.int64
        ).astype(np.int32)
        self.dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return self.num_sequences

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        total = int(self.sequence_lengths[index])
        if length is None:
            length = total - offset
        position = np.arange(offset, offset + length, dtype=np.int64)
        start, stride = (index * 7919) % (self.vocab_size - 1), 1 + index % 5
        tokens = (start + stride * position) % (self.vocab_size - 1)
        tokens += tokens >= self.eod  # ids other than EOD: skip over it
        tokens[position == total - 1] = self.eod
        return tokens

    def gather(
        self, sequences: np.ndarray, begins: np.ndarray, ends: np.ndarray, out: np.ndarray
    ) -> None:
        """Fill `out` with tokens begins[k] .. ends[k] - 1 of sequence sequences[k], in order."""
        pos = 0
        for sequence, begin, end in zip(
            sequences.tolist(), begins.tolist(), ends.tolist(), strict=True
        ):
            out[pos : pos + end - begin] = self.get(sequence, begin, end - begin)
            pos += end - begin
