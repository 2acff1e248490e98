"""GPT training samples cut from a range of sequences of an indexed dataset, Megatron style.

A sample is `seq_length + 1` consecutive tokens of the token stream (inputs plus next-token
labels); consecutive samples of the stream overlap by one token and run across sequence
boundaries, where the EOD that preprocessing appended separates the documents.

As in Megatron's GPTDataset, three index arrays describe an epoch:

    document_index  the sequences of the range, shuffled: this epoch's token stream
    sample_index    (samples + 1, 2): for each sample start, the position in document_index and
                    the token offset inside that sequence; sample i spans the stream from entry i
                    to entry i + 1 (plus one token)
    shuffle_index   the order in which the epoch's samples are served

Unlike Megatron, every epoch is indexed on its own (shuffled by (seed, epoch)), so sample n is a
function of (data, split, seq_length, seed, n) alone: it does not depend on the number of samples
requested, and resuming with a longer --train-iters continues the same sequence of samples.
Epoch indices are cached as .npy files keyed by a hash of that description.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from megatron_hybrid.data.indexed_dataset import IndexedDatasetError

logger = logging.getLogger(__name__)

INDEX_CACHE_VERSION = 1  # bump when the way indices are built changes
_EPOCHS_IN_MEMORY = 2


@dataclass(frozen=True)
class EpochIndex:
    document_index: np.ndarray
    sample_index: np.ndarray
    shuffle_index: np.ndarray


class TooFewTokensError(IndexedDatasetError):
    """A split of a dataset is too short for a single sample."""


class GPTDataset:
    """Samples of sequences `first_sequence .. end_sequence - 1` of `indexed` (an IndexedDataset
    or MockIndexedDataset). `cache_dir` None keeps the indices in memory only.

    Raises TooFewTokensError when the range holds fewer than seq_length + 1 tokens.
    """

    def __init__(
        self,
        indexed,
        first_sequence: int,
        end_sequence: int,
        seq_length: int,
        seed: int,
        split_name: str,
        cache_dir: str | None = None,
    ):
        self.indexed = indexed
        self.first_sequence, self.end_sequence = first_sequence, end_sequence
        self.seq_length, self.seed, self.split_name = seq_length, seed, split_name
        # A view of the (memory-mapped) int32 lengths: no copy of a 100M-sequence array.
        self.lengths = indexed.sequence_lengths[first_sequence:end_sequence]
        self.num_tokens = int(self.lengths.sum(dtype=np.int64))
        if self.num_tokens < seq_length + 1:
            raise TooFewTokensError(
                f"{split_name} split of {indexed.prefix} (sequences {first_sequence}.."
                f"{end_sequence - 1}, {end_sequence - first_sequence} sequences) has "
                f"{self.num_tokens} tokens, too few for one sample of seq_length + 1 = "
                f"{seq_length + 1}; give the split a larger share with --split, a shorter "
                "--seq-length, or more data"
            )
        self.samples_per_epoch = (self.num_tokens - 1) // seq_length
        self._epochs: dict[int, EpochIndex] = {}
        self._cache_dir = cache_dir
        self._cache_key = self._description_hash() if cache_dir else None

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.indexed.prefix!r}, {self.split_name}, sequences "
            f"{self.first_sequence}..{self.end_sequence - 1}, {self.num_tokens} tokens, "
            f"{self.samples_per_epoch} samples per epoch)"
        )

    # -- the index -----------------------------------------------------------------------------

    def _description_hash(self) -> str:
        description = {
            "class": "GPTDataset",
            "index_cache_version": INDEX_CACHE_VERSION,
            "path": os.path.abspath(self.indexed.prefix),
            "idx_fingerprint": _fingerprint(self.indexed.idx_path),
            "bin_bytes": os.path.getsize(self.indexed.bin_path),
            "sequences": [self.first_sequence, self.end_sequence],
            "seq_length": self.seq_length,
            "seed": self.seed,
        }
        text = json.dumps(description, sort_keys=True)
        self._description = text
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _cache_paths(self, epoch: int) -> dict[str, str]:
        base = os.path.join(self._cache_dir, f"{self._cache_key}-{self.split_name}-epoch{epoch}")
        return {
            name: f"{base}-{name}.npy"
            for name in ("document_index", "sample_index", "shuffle_index")
        }

    def build_epoch_index(self, epoch: int) -> EpochIndex:
        """The three index arrays of `epoch`, computed (no cache)."""
        rng = np.random.RandomState([self.seed % 2**32, epoch, 0x6D68])
        num_sequences = len(self.lengths)
        index_dtype = np.int32 if num_sequences < 2**31 else np.int64
        document_index = rng.permutation(num_sequences).astype(index_dtype)
        ends = np.cumsum(self.lengths[document_index], dtype=np.int64)
        starts = np.arange(self.samples_per_epoch + 1, dtype=np.int64) * self.seq_length
        # The sequence holding token `start` is the first whose end lies beyond it (side right
        # also skips empty sequences).
        position = np.searchsorted(ends, starts, side="right")
        offset = starts - (ends[position] - self.lengths[document_index[position]])
        sample_index = np.stack([position, offset], axis=1).astype(np.int64)
        shuffle_index = rng.permutation(self.samples_per_epoch).astype(np.int64)
        return EpochIndex(document_index, sample_index, shuffle_index)

    def epoch_index(self, epoch: int) -> EpochIndex:
        """The index of `epoch`: from memory, else the on-disk cache, else built (and cached)."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        index = self._load_cached(epoch) if self._cache_dir else None
        if index is None:
            index = self.build_epoch_index(epoch)
            if self._cache_dir:
                self._save_cached(epoch, index)
        if len(self._epochs) >= _EPOCHS_IN_MEMORY:
            self._epochs.pop(next(iter(self._epochs)))
        self._epochs[epoch] = index
        return index

    def prepare(self, num_samples: int) -> None:
        """Make sure the on-disk cache holds every epoch the first `num_samples` samples touch,
        so training never stops to build one (with no cache, only the first epoch is built)."""
        last_epoch = max(num_samples - 1, 0) // self.samples_per_epoch
        for epoch in range(last_epoch + 1 if self._cache_dir else 1):
            if (
                self._cache_dir
                and epoch not in self._epochs
                and all(map(os.path.isfile, self._cache_paths(epoch).values()))
            ):
                continue
            self.epoch_index(epoch)

    def _load_cached(self, epoch: int) -> EpochIndex | None:
        paths = self._cache_paths(epoch)
        if not all(map(os.path.isfile, paths.values())):
            return None
        arrays = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
        return EpochIndex(**arrays)

    def _save_cached(self, epoch: int, index: EpochIndex) -> None:
        """Write each array under a temporary name, then rename: ranks that build the same index
        at once never read a half-written file."""
        try:
            os.makedirs(self._cache_dir, exist_ok=True)
            description_path = os.path.join(self._cache_dir, f"{self._cache_key}-description.json")
            if not os.path.isfile(description_path):
                _write_atomically(description_path, lambda f: f.write(self._description.encode()))
            for name, path in self._cache_paths(epoch).items():
                array = getattr(index, name)
                _write_atomically(path, lambda f, a=array: np.save(f, a))
        except OSError as error:
            logger.warning(
                "cannot cache the %s index of %s in %s (%s); keeping it in memory",
                self.split_name,
                self.indexed.prefix,
                self._cache_dir,
                error,
            )
            self._cache_dir = None

    # -- reading samples -----------------------------------------------------------------------

    def read(self, sample_ids: np.ndarray, out: np.ndarray) -> None:
        """Fill out[k] (an int64 row of seq_length + 1) with sample sample_ids[k]."""
        for row, sample_id in zip(out, sample_ids.tolist(), strict=True):
            epoch, local = divmod(sample_id, self.samples_per_epoch)
            index = self.epoch_index(epoch)
            j = int(index.shuffle_index[local])
            (first, offset), (last, end_offset) = index.sample_index[j : j + 2].tolist()
            sequences = np.asarray(index.document_index[first : last + 1], dtype=np.int64)
            begins = np.zeros(len(sequences), dtype=np.int64)
            begins[0] = offset
            ends = self.lengths[sequences].astype(np.int64)
            ends[-1] = end_offset + 1  # the extra token: the label of the last input
            self.indexed.gather(sequences + self.first_sequence, begins, ends, row)


def _write_atomically(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _fingerprint(path: str, span: int = 1 << 20) -> str:
    """Size plus a hash of the first and last MiB of a file: data rewritten in place (other
    sequence lengths) gets a new cache key, without reading a multi-GB index in full."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(span))
        if size > span:
            f.seek(max(size - span, span))
            digest.update(f.read(span))
    return digest.hexdigest()[:20]
