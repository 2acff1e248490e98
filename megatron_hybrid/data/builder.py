"""From data flags to the train / valid / test sample sources the trainer reads.

    add_data_args(parser)              # the flags; training/arguments.py maps them to DataSettings
    splits = build_datasets(data, tokenizer, seq_length, seed, num_train_samples,
                            num_eval_samples)
    splits.train.batch(first_sample, count)   # global samples: (count, seq_length + 1)

Which global samples a data-parallel rank reads is data/sharding.py's rule, not the datasets'.

Data sources, Megatron's flags:

    --data-path A B                  prefixes of indexed datasets, mixed by their token counts
    --data-path 0.3 A 0.7 B          mixed 30/70; each dataset is split by --split (969,30,1:
                                     train/valid/test shares of its sequences, Megatron's rule)
    --train-data-path ... --valid-data-path ... --test-data-path ...
                                     a blend per split, each dataset used whole (no --split)
    --mock-data                      synthetic data, same code path (mock_dataset.py)

Sample order: global sample n of a split is a function of (data, --split, seq_length, seed, n)
alone, so resuming after n consumed samples continues with sample n + 1 (the checkpoint stores
n), whatever --train-iters is now.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from megatron_hybrid.data.blended_dataset import BlendedDataset
from megatron_hybrid.data.gpt_dataset import GPTDataset, TooFewTokensError
from megatron_hybrid.data.indexed_dataset import IndexedDataset, IndexedDatasetError
from megatron_hybrid.data.mock_dataset import MockIndexedDataset
from megatron_hybrid.data.tokenizer import Tokenizer, add_tokenizer_args

SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_SPLIT = "969,30,1"
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class DataConfigError(ValueError):
    """Data flags that do not parse or do not fit together."""


class DataSplit:
    """One split (a dataset or a blend): `batch(first, count)` reads global samples first ..
    first + count - 1, as `StreamSampler.batch` does for the embedded corpus."""

    def __init__(self, name: str, dataset, num_samples: int, seq_length: int):
        self.name, self.dataset, self.num_samples = name, dataset, num_samples
        self.seq_length = seq_length

    def batch(self, first_sample: int, batch_size: int) -> torch.Tensor:
        """Global samples first_sample .. first_sample + batch_size - 1, stacked: int64
        (batch_size, seq_length + 1)."""
        out = np.empty((batch_size, self.seq_length + 1), dtype=np.int64)
        self.dataset.read(first_sample + np.arange(batch_size, dtype=np.int64), out)
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"DataSplit({self.name}, {self.num_samples} samples, {self.dataset!r})"


@dataclass(frozen=True)
class DataSplits:
    train: DataSplit | None
    valid: DataSplit | None
    test: DataSplit | None
    notes: tuple[str, ...] = ()  # what was left out and why: one line each for the log

    def summary(self) -> str:
        """One line per split, for the training log."""
        lines = []
        for name in SPLIT_NAMES:
            split = getattr(self, name)
            if split is None:
                lines.append(f"{name}: none")
                continue
            parts = (
                split.dataset.datasets
                if isinstance(split.dataset, BlendedDataset)
                else [split.dataset]
            )
            weights = split.dataset.weights if isinstance(split.dataset, BlendedDataset) else [1.0]
            described = ", ".join(
                f"{w:.3g} x {d.indexed.prefix} ({d.num_tokens} tokens)"
                for w, d in zip(weights, parts, strict=True)
            )
            lines.append(f"{name}: {described}")
        return "; ".join(lines)


@dataclass
class DataSettings:
    """Where the training, validation and test samples come from (the "data" flags, tokenizer
    aside: data/tokenizer.py's TokenizerSettings). No source at all: the embedded corpus."""

    data_path: list[str] | None = None
    """Indexed dataset prefixes, optionally weighted ('0.3 A 0.7 B'), each split by `split`."""
    split: str = DEFAULT_SPLIT
    """train,valid,test shares of each `data_path` dataset's sequences (Megatron's --split)."""
    train_data_path: list[str] | None = None
    """The training blend, datasets used whole (instead of `data_path`)."""
    valid_data_path: list[str] | None = None
    """The validation blend, datasets used whole (with `train_data_path`)."""
    test_data_path: list[str] | None = None
    """The test blend, datasets used whole (with `train_data_path`)."""
    mock_data: bool = False
    """Synthetic documents of the tokenizer's ids through the same pipeline."""
    data_cache_path: str | None = None
    """Folder for the sample index cache; None: index_cache/ next to each dataset."""

    def blend_of(self, split: str) -> list[str]:
        """The prefixes (and weights) of one split's own flag (`train_data_path`, ...), or []."""
        return getattr(self, f"{split}_data_path") or []


_DATA = DataSettings()


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the argparse group "data": data paths, split, mock data, index cache, tokenizer
    (defaults from DataSettings and TokenizerSettings)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path",
        nargs="*",
        default=_DATA.data_path,
        metavar="[WEIGHT] PREFIX",
        help="indexed datasets (PREFIX.bin/.idx), optionally weighted: "
        "'0.3 A 0.7 B'; without weights, mixed by token count. Neither this nor "
        "--mock-data: train on the embedded default corpus",
    )
    group.add_argument(
        "--split",
        default=_DATA.split,
        help="train,valid,test shares of each --data-path dataset's sequences",
    )
    for name in SPLIT_NAMES:
        group.add_argument(
            f"--{name}-data-path",
            nargs="*",
            metavar="[WEIGHT] PREFIX",
            default=getattr(_DATA, f"{name}_data_path"),
            help=f"{name} split only, datasets used whole (instead of --data-path)",
        )
    group.add_argument(
        "--mock-data",
        action="store_true",
        default=_DATA.mock_data,
        help="synthetic data through the same pipeline (smoke tests, benchmarks)",
    )
    group.add_argument(
        "--data-cache-path",
        default=_DATA.data_cache_path,
        help="folder for the sample index cache (None: index_cache/ next to each dataset)",
    )
    add_tokenizer_args(group)
    return group


# -- parsing the flags ---------------------------------------------------------------------------


def parse_split(text: str) -> tuple[float, float, float]:
    """'969,30,1' -> normalized (train, valid, test) weights; fewer values mean zeros."""
    pieces = [p.strip() for p in re.split(r"[,/]", text)]
    expected = "expected up to three non-negative numbers separated by commas, like 969,30,1"
    if not 1 <= len(pieces) <= 3 or not all(_NUMBER.fullmatch(p) for p in pieces):
        raise DataConfigError(f"--split {text!r}: {expected}")
    weights = [float(p) for p in pieces] + [0.0] * (3 - len(pieces))
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataConfigError(f"--split {text!r}: {expected}, not all zero")
    total = sum(weights)
    return tuple(w / total for w in weights)


def split_ranges(split: tuple[float, float, float], size: int) -> list[tuple[int, int]]:
    """[begin, end) sequence ranges of the three splits of `size` sequences (Megatron's rule:
    rounded cumulative shares, the rounding error taken off every boundary)."""
    bounds = [0]
    for share in split:
        bounds.append(bounds[-1] + int(round(share * size)))
    excess = bounds[-1] - size
    bounds = [0] + [min(max(b - excess, 0), size) for b in bounds[1:]]
    return [(bounds[i], max(bounds[i], bounds[i + 1])) for i in range(3)]


def parse_blend(values: list[str], flag: str = "--data-path") -> list[tuple[float | None, str]]:
    """`['0.3', 'A', '0.7', 'B']` -> [(0.3, 'A'), (0.7, 'B')]; `['A', 'B']` -> [(None, 'A'),
    (None, 'B')]. Raises DataConfigError naming the flag and the offending value."""
    if not values:
        raise DataConfigError(f"{flag} needs at least one dataset prefix")
    shown = " ".join(values)
    if not _NUMBER.fullmatch(values[0]):
        numbers = [v for v in values if _NUMBER.fullmatch(v)]
        if numbers:
            raise DataConfigError(
                f"{flag} {shown}: {numbers[0]!r} looks like a weight, but {values[0]!r} has "
                "none; give every prefix a weight ('0.3 A 0.7 B') or none ('A B')"
            )
        return [(None, v) for v in values]
    if len(values) % 2:
        raise DataConfigError(
            f"{flag} {shown}: expected WEIGHT PREFIX pairs like '0.3 A 0.7 B';"
            f" the last weight {values[-1]!r} has no prefix after it"
        )
    blend = []
    for weight, prefix in zip(values[0::2], values[1::2], strict=True):
        if not _NUMBER.fullmatch(weight):
            raise DataConfigError(
                f"{flag} {shown}: expected a weight before {prefix!r}, found "
                f"{weight!r}; give WEIGHT PREFIX pairs like '0.3 A 0.7 B'"
            )
        if _NUMBER.fullmatch(prefix):
            raise DataConfigError(
                f"{flag} {shown}: expected a dataset prefix after weight "
                f"{weight}, found another number {prefix!r}"
            )
        if float(weight) < 0 or not math.isfinite(float(weight)):
            raise DataConfigError(f"{flag} {shown}: weight {weight} of {prefix} must be >= 0")
        blend.append((float(weight), prefix))
    if sum(w for w, _ in blend) <= 0:
        raise DataConfigError(f"{flag} {shown}: the weights sum to 0; expected a positive sum")
    return blend


# -- data against the tokenizer ------------------------------------------------------------------


def check_tokenizer_fits(indexed: IndexedDataset, tokenizer: Tokenizer) -> None:
    """Raise IndexedDatasetError when `indexed` cannot hold `tokenizer`'s ids (its dtype is too
    narrow or not integer) or when a sample of its tokens (up to ~1M, spread over the file)
    holds an id outside the vocabulary: signs of data preprocessed with another tokenizer."""
    dtype, vocab = indexed.dtype, tokenizer.vocab_size
    advice = (
        "the data was preprocessed with a different tokenizer; pass the --tokenizer-type "
        "and tokenizer files that preprocessing used"
    )
    if dtype.kind not in "iu":
        raise IndexedDatasetError(
            f"{indexed.bin_path} holds {dtype.name} values; token ids must "
            "be integers (expected uint16 or int32)"
        )
    if vocab - 1 > np.iinfo(dtype).max:
        raise IndexedDatasetError(
            f"{indexed.bin_path} stores {dtype.name} tokens (ids up to {np.iinfo(dtype).max}), "
            f"but the tokenizer {tokenizer.name} has {vocab} ids: {advice}"
        )
    count = len(indexed)
    for i in np.unique(np.linspace(0, count - 1, num=min(count, 64)).astype(np.int64)).tolist():
        tokens = indexed.get(i, 0, min(int(indexed.sequence_lengths[i]), 16_384))
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            bad = tokens.max() if tokens.max() >= vocab else tokens.min()
            raise IndexedDatasetError(
                f"{indexed.bin_path} holds token id {bad} (sequence {i}), outside the ids "
                f"0..{vocab - 1} of the tokenizer {tokenizer.name}: {advice}"
            )


# -- building ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rank_zero_first():
    """With torch.distributed initialized, rank 0 builds (and caches) indices before the other
    ranks, which then read the cache instead of building the same arrays at once."""
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if active and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if active and dist.get_rank() == 0:
            dist.barrier()


def _cache_dir(data: DataSettings, indexed) -> str | None:
    if isinstance(indexed, MockIndexedDataset):
        return None
    if data.data_cache_path:
        return data.data_cache_path
    return os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "index_cache")


def _build_split(
    name: str,
    parts,
    data: DataSettings,
    seq_length: int,
    seed: int,
    num_samples: int,
    notes: list[str],
) -> DataSplit | None:
    """`parts`: (weight or None, dataset, first sequence, end sequence) for one split. What is
    left out (a dataset whose share is too small) is added to `notes`, which the training log
    prints once (a small test share is common and no error)."""
    datasets, weights = [], []
    for weight, indexed, begin, end in parts:
        if weight == 0:
            continue
        try:
            if end <= begin:
                raise TooFewTokensError(
                    f"{name} split of {indexed.prefix} is empty (none of "
                    f"its {len(indexed)} sequences); give it a larger share "
                    "with --split"
                )
            dataset = GPTDataset(
                indexed, begin, end, seq_length, seed, name, _cache_dir(data, indexed)
            )
        except TooFewTokensError as error:
            if name == "train":
                raise
            notes.append(f"{name} data leaves out {indexed.prefix}: {error}")
            continue
        datasets.append(dataset)
        weights.append(dataset.num_tokens if weight is None else weight)
    if not datasets:
        if name == "train":
            raise DataConfigError("no training data: --split gives the train split no share")
        notes.append(f"no {name} data: evaluation on the {name} split is skipped")
        return None
    if len(datasets) == 1:
        datasets[0].prepare(num_samples)
        source = datasets[0]
    else:
        source = BlendedDataset(datasets, weights)
        needed = source.samples_needed(num_samples)
        for dataset, count in zip(datasets, needed, strict=True):
            dataset.prepare(count)
    return DataSplit(name, source, num_samples, seq_length)


def build_datasets(
    data: DataSettings,
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    num_train_samples: int,
    num_eval_samples: int,
) -> DataSplits | None:
    """The train / valid / test splits `data` describes, or None when it names no source (the
    trainer then uses its embedded corpus). `num_*_samples` count global samples
    (all data-parallel ranks); they decide which epoch indices are built up front, not what the
    samples are. A split with no share is None. Collective when torch.distributed is
    initialized: every rank calls it.

    Raises DataConfigError for flags that do not parse or fit together, IndexedDatasetError
    (IndexedDatasetNotFoundError for a missing file) for unreadable data or data that does not
    match the tokenizer.
    """
    for flag, value in (
        ("--data-path", data.data_path),
        *((f"--{name}-data-path", getattr(data, f"{name}_data_path")) for name in SPLIT_NAMES),
    ):
        if value is not None and not [v for v in value if v.strip()]:
            raise DataConfigError(
                f"{flag} was given no dataset (an empty shell variable?): give "
                "[WEIGHT] PREFIX ..., or drop the flag to train on the embedded corpus"
            )
    data_path = data.data_path or []
    per_split = {name: data.blend_of(name) for name in SPLIT_NAMES}
    mock = data.mock_data
    if not (data_path or mock or any(per_split.values())):
        return None
    if sum(map(bool, (data_path, mock, any(per_split.values())))) > 1:
        raise DataConfigError(
            "give one data source: --data-path, --mock-data, or "
            "--train-data-path with --valid-data-path / --test-data-path"
        )
    if any(per_split.values()) and not per_split["train"]:
        raise DataConfigError("--valid-data-path / --test-data-path need --train-data-path too")

    opened: dict[str, IndexedDataset] = {}

    def open_dataset(prefix: str) -> IndexedDataset:
        if prefix not in opened:
            opened[prefix] = IndexedDataset(prefix)
            check_tokenizer_fits(opened[prefix], tokenizer)
        return opened[prefix]

    parts: dict[str, list] = {}
    if any(per_split.values()):
        for name in SPLIT_NAMES:
            blend = parse_blend(per_split[name], f"--{name}-data-path") if per_split[name] else []
            parts[name] = [(w, d, 0, len(d)) for w, d in ((w, open_dataset(p)) for w, p in blend)]
    else:
        split = parse_split(data.split or DEFAULT_SPLIT)
        if mock:
            sources = [
                (1.0, MockIndexedDataset(tokenizer.vocab_size, tokenizer.eod, 2 * seq_length))
            ]
        else:
            sources = [(w, open_dataset(p)) for w, p in parse_blend(data_path)]
        for i, name in enumerate(SPLIT_NAMES):
            parts[name] = (
                []
                if split[i] == 0
                else [(w, d, *split_ranges(split, len(d))[i]) for w, d in sources]
            )

    splits, notes = {}, []
    with _rank_zero_first():
        for name in SPLIT_NAMES:
            num_samples = num_train_samples if name == "train" else num_eval_samples
            if not parts[name]:
                if name == "train":
                    raise DataConfigError(
                        "no training data: --split gives the train split no share"
                    )
                splits[name] = None
                continue
            splits[name] = _build_split(
                name, parts[name], data, seq_length, seed, num_samples, notes
            )
    return DataSplits(**splits, notes=tuple(notes))
