"""Blending several datasets by weight, deterministically and without a stored index.

Each global sample is assigned to one dataset so that after any number n of samples, dataset j
has served round(n * w_j) samples give or take one (for a handful of datasets): the error-
minimizing interleaving Megatron's BlendedDataset builds greedily. Here it is a stride schedule:
the k-th sample of dataset j is due at time (k + 1/2) / w_j and samples are served in order of
due time (ties: lower dataset index first). The schedule is cut into time windows of `window`
units, each computed on its own in a few microseconds per sample, so any global sample's
assignment is a pure function of (weights, index): nothing to build up front, nothing to cache,
and resuming at sample n needs no state but n.
"""

from __future__ import annotations

import math

import numpy as np

_WINDOWS_IN_MEMORY = 4


class BlendedDataset:
    """`datasets` (objects with `read(sample_ids, out)`) mixed by `weights` (positive; they are
    normalized to sum to 1)."""

    def __init__(self, datasets: list, weights: list[float], window: int = 4096):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(
                f"need one weight per dataset, got {len(weights)} weights for "
                f"{len(datasets)} datasets"
            )
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise ValueError(f"blend weights must be positive and finite, got {weights}")
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, dtype=np.float64) / math.fsum(weights)
        self.window = window
        # window_starts[m]: global index of the first sample of window m (grown on demand).
        self._window_starts = np.zeros(1, dtype=np.int64)
        self._windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _samples_due_before(self, windows: np.ndarray) -> np.ndarray:
        """(len(windows), datasets): how many samples of each dataset are due before the start
        of each window, i.e. k with (k + 1/2) / w < m * window."""
        times = windows.astype(np.float64)[:, None] * self.window
        return np.maximum(np.ceil(times * self.weights[None, :] - 0.5), 0).astype(np.int64)

    def _window_of(self, sample_ids: np.ndarray) -> np.ndarray:
        needed = int(sample_ids.max()) // self.window + 2
        while self._window_starts[-1] <= sample_ids.max():
            count = max(needed, 2 * len(self._window_starts))
            self._window_starts = self._samples_due_before(np.arange(count)).sum(axis=1)
        return np.searchsorted(self._window_starts, sample_ids, side="right") - 1

    def _window(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset id, sample id within that dataset) of every sample of window m, in order."""
        if m not in self._windows:
            lo, hi = self._samples_due_before(np.array([m, m + 1]))
            dataset_ids = np.repeat(np.arange(len(self.weights)), hi - lo)
            sample_ids = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)])
            due = (sample_ids + 0.5) / self.weights[dataset_ids]
            order = np.lexsort((dataset_ids, due))
            if len(self._windows) >= _WINDOWS_IN_MEMORY:
                self._windows.pop(next(iter(self._windows)))
            self._windows[m] = (dataset_ids[order], sample_ids[order])
        return self._windows[m]

    def assign(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global samples `sample_ids`: (dataset index, sample index within that dataset)."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        dataset_ids = np.empty_like(sample_ids)
        inner_ids = np.empty_like(sample_ids)
        if sample_ids.size == 0:
            return dataset_ids, inner_ids
        windows = self._window_of(sample_ids)
        for m in np.unique(windows).tolist():
            selected = windows == m
            ds, inner = self._window(m)
            local = sample_ids[selected] - self._window_starts[m]
            dataset_ids[selected], inner_ids[selected] = ds[local], inner[local]
        return dataset_ids, inner_ids

    def samples_needed(self, num_samples: int) -> list[int]:
        """Samples each dataset serves among the first `num_samples` global samples."""
        if num_samples <= 0:
            return [0] * len(self.datasets)
        m = int(self._window_of(np.array([num_samples]))[0])
        before = self._samples_due_before(np.array([m]))[0]
        in_window = self._window(m)[0][: num_samples - self._window_starts[m]]
        return (before + np.bincount(in_window, minlength=len(self.datasets))).tolist()

    def read(self, sample_ids: np.ndarray, out: np.ndarray) -> None:
        """Fill out[k] with global sample sample_ids[k]."""
        dataset_ids, inner_ids = self.assign(sample_ids)
        for j in np.unique(dataset_ids).tolist():
            rows = np.flatnonzero(dataset_ids == j)
            block = np.empty((len(rows), out.shape[1]), dtype=out.dtype)
            self.datasets[j].read(inner_ids[rows], block)
            out[rows] = block
