#!/usr/bin/env python3
"""How fast `.batch()` serves training samples, on one CPU core.

Writes synthetic indexed datasets (documents of log-normal length, mean ~1000 tokens, ending in
EOD) to a temporary folder, builds the splits as training does, and times reading consecutive
micro-batches of seq_length + 1 tokens with torch.set_num_threads(1). Training needs
global_batch x seq_length tokens per step; at >= 1M tokens/s the data never holds a step up.

    python benchmarks/data_sampling.py [--seq-length 4096] [--tokens 20000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import numpy as np
import torch
from timing import Stopwatch  # benchmarks/timing.py, beside this script

from megatron_hybrid.data.builder import DataSettings, add_data_args, build_datasets
from megatron_hybrid.data.indexed_dataset import IndexedDatasetWriter
from megatron_hybrid.data.tokenizer import ByteTokenizer, build_tokenizer
from megatron_hybrid.training.arguments import flags_to_settings


def write_dataset(prefix: str, num_tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        written = 0
        while written < num_tokens:
            length = int(np.clip(rng.lognormal(6.5, 1.0), 8, 50_000))
            tokens = rng.integers(0, 256, length, dtype=np.uint16)
            tokens[-1] = ByteTokenizer.eod
            writer.add_document(tokens)
            written += length


def time_batches(split, micro_batch_size: int, seconds: float) -> tuple[float, int]:
    """(tokens per second, samples read) reading consecutive micro-batches for ~`seconds`."""
    split.batch(0, micro_batch_size)  # touch the epoch index once
    stopwatch, first = Stopwatch(), micro_batch_size
    while stopwatch.elapsed_s() < seconds:
        split.batch(first, micro_batch_size)
        first += micro_batch_size
    elapsed = stopwatch.elapsed_s()
    samples = first - micro_batch_size
    return samples * split.seq_length / elapsed, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="tokens per dataset")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per case")
    parser.add_argument("--json", default="data_sampling.json", help="results file")
    options = parser.parse_args()
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):  # one core, not just one thread
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    data_parser = argparse.ArgumentParser()
    add_data_args(data_parser)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        prefixes = [os.path.join(folder, f"corpus{i}") for i in range(3)]
        stopwatch = Stopwatch()
        for i, prefix in enumerate(prefixes):
            write_dataset(prefix, options.tokens, seed=i)
        print(f"wrote 3 x {options.tokens / 1e6:.0f}M tokens in {stopwatch.elapsed_s():.1f}s")
        cases = {
            "one dataset": ["--data-path", prefixes[0]],
            "blend of 3 (0.5/0.3/0.2)": [
                "--data-path",
                "0.5",
                prefixes[0],
                "0.3",
                prefixes[1],
                "0.2",
                prefixes[2],
            ],
            "mock data": ["--mock-data"],
        }
        for name, flags in cases.items():
            args = data_parser.parse_args(
                flags + ["--data-cache-path", os.path.join(folder, "cache")]
            )
            stopwatch = Stopwatch()
            splits = build_datasets(
                flags_to_settings(DataSettings, args),
                build_tokenizer(args),
                options.seq_length,
                seed=1234,
                num_train_samples=100_000,
                num_eval_samples=1000,
            )
            build_s = stopwatch.elapsed_s()
            tokens_per_s, samples = time_batches(
                splits.train, options.micro_batch_size, options.seconds
            )
            results.append(
                {
                    "case": name,
                    "seq_length": options.seq_length,
                    "micro_batch_size": options.micro_batch_size,
                    "index_build_s": round(build_s, 3),
                    "samples": samples,
                    "tokens_per_s": round(tokens_per_s),
                }
            )

    print(f"\n{'case':<28} {'index build':>12} {'samples':>9} {'tokens/s (1 core)':>19}")
    for r in results:
        print(
            f"{r['case']:<28} {r['index_build_s']:>11.2f}s {r['samples']:>9} "
            f"{r['tokens_per_s'] / 1e6:>17.1f}M"
        )
    report = {
        "benchmark": "data_sampling",
        "threads": 1,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "results": results,
    }
    with open(options.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {options.json}")


if __name__ == "__main__":
    main()
