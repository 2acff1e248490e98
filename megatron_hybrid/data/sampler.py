"""Fixed-length training samples cut from a token stream, in a deterministic, resumable order.

A sample is `seq_length + 1` consecutive tokens (inputs and next-token labels), spanning document
boundaries. Epoch e visits every window start `offset_e + k * seq_length` once, in an order
shuffled by (seed, e); `offset_e` is drawn per epoch too, so successive epochs cut the text at
different places. Sample n of the whole run is a function of (seed, n) alone: resuming after n
consumed samples continues with sample n + 1.
"""

from __future__ import annotations

import numpy as np
import torch


class StreamSampler:
    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int, shuffle: bool = True):
        if len(tokens) < seq_length + 2:
            raise ValueError(
                f"the token stream has {len(tokens)} tokens, too few for one sample of "
                f"seq_length + 1 = {seq_length + 1} tokens (plus one for the per-epoch offset); "
                "use a shorter --seq-length or more data"
            )
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.seq_length = seq_length
        self.seed = seed
        self.shuffle = shuffle
        # One token of slack so every per-epoch offset in [0, seq_length) still fits the windows.
        self.samples_per_epoch = (len(tokens) - 1 - seq_length) // seq_length
        self.num_samples = self.samples_per_epoch  # distinct windows (what evaluation can use)
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(self.samples_per_epoch)
                offset = int(rng.integers(0, self.seq_length))
            else:
                order, offset = np.arange(self.samples_per_epoch), 0
            self._epoch_cache = (epoch, order, offset)
        return self._epoch_cache[1], self._epoch_cache[2]

    def sample(self, index: int) -> torch.Tensor:
        epoch, k = divmod(index, self.samples_per_epoch)
        order, offset = self._epoch(epoch)
        start = offset + int(order[k]) * self.seq_length
        return self.tokens[start : start + self.seq_length + 1]

    def batch(self, first_sample: int, batch_size: int) -> torch.Tensor:
        """Samples first_sample .. first_sample + batch_size - 1 stacked: (batch, seq + 1)."""
        return torch.stack([self.sample(first_sample + i) for i in range(batch_size)])
