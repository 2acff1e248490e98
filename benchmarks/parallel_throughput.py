"""Training throughput per GPU for parallel layouts, side by side in one run.

Launches `scripts/pretrain_hybrid.py` once per layout (one GPU, then torchrun with dp / tp / pp
/ ep over the GPUs given) on the same model and global batch, reads the trainer's own
tokens/s (metrics.jsonl, iterations after warm-up), and prints tokens/s in total and per GPU
against the one-GPU run. Writes JSON with --out.

    python benchmarks/parallel_throughput.py --gpus 2 --out parallel.json
    python benchmarks/parallel_throughput.py --layout dp2 --layout tp2 --iters 40
    python benchmarks/parallel_throughput.py --layout 1gpu --layout dp2 \
        --sharding-strategy no_shard --sharding-strategy optim_grads \
        --sharding-strategy optim_grads_params

With --sharding-strategy, every layout with more than one data-parallel rank runs once per
strategy given (--data-parallel-sharding-strategy), named like "dp2/no_shard"; without, once
under the trainer's default.

With --profile, every run also records a torch.profiler trace of `--profile-iters` iterations
right after the warm-up on every rank (the training script's --profile --use-pytorch-profiler),
and benchmarks/trace_summary.py's figures per rank (GPU busy and idle time, communication
and how much of it no compute hides, per step) go beside its tokens/s; the profiled
iterations are left out of the median.

The model is the Nemotron-H-style 208M of examples/nemotron_h_style_gpu.sh (byte vocabulary,
embedded data), bf16, --kernels auto; or, with --config, one of benchmarks/train_throughput.py's
models (megatron-ci-hybrid, hybrid-1b, ...) at its sequence length and micro-batch, on the same
data. Flags after `--` reach every run, e.g. the compile settings the one-GPU figures used:

    python benchmarks/parallel_throughput.py --config megatron-ci-hybrid --layout 1gpu \
        --layout dp2 -- --compile --compile-mode reduce-overhead --recompute-granularity selective
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trace_summary import as_json, labels, summarize_file, trace_files  # beside this script
from train_throughput import (
    CONFIGS,
    split_training_flags,
)  # benchmarks/train_throughput.py, beside this script

from megatron_hybrid.parallel.data_parallel import SHARDING_STRATEGIES

REPO = Path(__file__).resolve().parents[1]
# The default model's flags; its shape flags (pattern to chunk size) are replaced by a
# --config's, the rest (schedule, precision, data) kept.
MODEL = [
    "--hybrid-layer-pattern",
    "M-M-M-M*-M-M-M-M*-M-M-M-M-",
    "--hidden-size",
    "1024",
    "--ffn-hidden-size",
    "4096",
    "--num-attention-heads",
    "16",
    "--num-query-groups",
    "8",
    "--mamba-state-dim",
    "128",
    "--mamba-head-dim",
    "64",
    "--mamba-num-groups",
    "8",
    "--mamba-chunk-size",
    "128",
    "--seq-length",
    "1024",
    "--micro-batch-size",
    "4",
]
TRAINING = [
    "--lr",
    "6e-4",
    "--min-lr",
    "6e-5",
    "--lr-warmup-iters",
    "5",
    "--bf16",
    "--eval-iters",
    "0",
    "--generate-tokens",
    "0",
    "--no-progress-bar",
    "--kernels",
    "auto",
]
# name -> (processes, extra flags)
LAYOUTS = {
    "1gpu": (1, []),
    "dp2": (2, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp4": (4, []),
    "tp2-dp2": (4, ["--tensor-model-parallel-size", "2"]),
}


def data_parallel_size(nproc: int, flags: list[str]) -> int:
    """The data-parallel ranks of a layout: what tensor and pipeline parallelism leave."""
    sizes = dict(zip(flags[::2], flags[1::2], strict=False))
    tp = int(sizes.get("--tensor-model-parallel-size", 1))
    pp = int(sizes.get("--pipeline-model-parallel-size", 1))
    return nproc // (tp * pp)


def runs(layouts: list[str], strategies: list[str] | None) -> list[tuple[str, str, str | None]]:
    """(run name, layout, sharding strategy or None for the default) of every run: one per
    strategy for each layout with data parallelism, one for the others."""
    plan = []
    for layout in layouts:
        nproc, flags = LAYOUTS[layout]
        if strategies and data_parallel_size(nproc, flags) > 1:
            plan.extend((f"{layout}/{s}", layout, s) for s in strategies)
        else:
            plan.append((layout, layout, None))
    return plan


def model_flags(config: str | None) -> list[str]:
    """The model's shape flags: the default 208M, or a train_throughput.py config at its
    sequence length and micro-batch."""
    if config is None:
        return MODEL
    bench = CONFIGS[config]
    return [
        *bench.model_flags(),
        "--seq-length",
        str(bench.seq_length),
        "--micro-batch-size",
        str(bench.micro_batch),
    ]


def profiled_iterations(args: argparse.Namespace) -> range:
    """The iterations --profile traces: the first ones after the warm-up."""
    first = args.warmup + 1
    return range(first, min(first + args.profile_iters, args.iters + 1))


def profile_flags(args: argparse.Namespace) -> list[str]:
    if not args.profile:
        return []
    iterations = profiled_iterations(args)
    return [
        "--profile",
        "--use-pytorch-profiler",
        "--profile-step-start",
        str(iterations.start),
        "--profile-step-end",
        str(iterations.stop),
    ]


def trace_summaries(log_dir: Path) -> list[dict]:
    """trace_summary.py's figures for each rank's trace the run wrote."""
    files = trace_files([str(log_dir / "torch_profile")])
    return [
        as_json(summarize_file(f, label)) for f, label in zip(files, labels(files), strict=True)
    ]


def run_layout(name: str, layout: str, strategy: str | None, args: argparse.Namespace) -> dict:
    nproc, flags = LAYOUTS[layout]
    if strategy is not None:
        flags = [*flags, "--data-parallel-sharding-strategy", strategy]
    flags = [*flags, *profile_flags(args)]
    log_dir = Path(tempfile.mkdtemp(prefix=f"throughput-{name.replace('/', '-')}-"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(REPO / "scripts" / "pretrain_hybrid.py"),
        *model_flags(args.config),
        *TRAINING,
        *flags,
        *args.extra,
        "--global-batch-size",
        str(args.global_batch_size),
        "--train-iters",
        str(args.iters),
        "--log-interval",
        "1",
        "--log-dir",
        str(log_dir),
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=args.timeout,
        env={**os.environ, "OMP_NUM_THREADS": "4"},
    )
    if proc.returncode != 0:
        return dict(
            layout=name,
            strategy=strategy,
            gpus=nproc,
            config=args.config,
            extra=args.extra,
            error=(proc.stdout + proc.stderr)[-2000:],
        )
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    profiled = profiled_iterations(args) if args.profile else range(0)
    steady = [
        r
        for r in records
        if "tokens_per_sec" in r and r["iteration"] > args.warmup and r["iteration"] not in profiled
    ]
    tokens_per_s = statistics.median(r["tokens_per_sec"] for r in steady)
    peak = max((r.get("peak_memory_gib", 0.0) for r in steady), default=None)
    traces = {"trace": trace_summaries(log_dir)} if args.profile else {}
    return dict(
        layout=name,
        strategy=strategy,  # None: the trainer's default
        gpus=nproc,
        config=args.config,  # None: the default 208M model
        extra=args.extra,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=tokens_per_s / nproc,
        peak_memory_gib=peak,
        final_loss=steady[-1]["loss"],
        iterations=len(steady),
        **traces,
    )


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_training_flags(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        choices=sorted(c for c, bench in CONFIGS.items() if bench.gpu),
        default=None,
        help="a train_throughput.py model (default: the Nemotron-H-style 208M)",
    )
    parser.add_argument(
        "--layout",
        action="append",
        choices=sorted(LAYOUTS),
        default=None,
        help="layout to run, repeatable (default: 1gpu and every layout that fits --gpus)",
    )
    parser.add_argument(
        "--sharding-strategy",
        action="append",
        choices=SHARDING_STRATEGIES,
        default=None,
        help="data-parallel sharding strategy, repeatable: layouts with data parallelism run "
        "once per strategy (default: once, under the trainer's default)",
    )
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="iterations left out of the median (compilation, autotuning)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also trace iterations after the warm-up on every rank and summarize them",
    )
    parser.add_argument(
        "--profile-iters", type=int, default=2, help="iterations traced with --profile (2)"
    )
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.extra = extra
    layouts = args.layout or [n for n, (p, _) in LAYOUTS.items() if p <= args.gpus]
    results = []
    for name, layout, strategy in runs(layouts, args.sharding_strategy):
        results.append(run_layout(name, layout, strategy, args))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    base = next((r for r in results if r["layout"] == "1gpu" and "error" not in r), None)
    print(
        f"\n{'layout':<24} {'GPUs':>4} {'tokens/s':>10} {'per GPU':>10} {'vs 1 GPU':>9} "
        f"{'peak GiB':>9}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['layout']:<24} {r['gpus']:>4} failed: {r['error'][-300:]}")
            continue
        ratio = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s']:.2f}x" if base else "n/a"
        print(
            f"{r['layout']:<24} {r['gpus']:>4} {r['tokens_per_s']:>10.0f} "
            f"{r['tokens_per_s_per_gpu']:>10.0f} {ratio:>9} {r['peak_memory_gib'] or 0:>9.2f}"
        )
    traced = [r for r in results if r.get("trace")]
    if traced:
        print(
            f"\n{'layout / trace':<36} {'step ms':>8} {'busy':>8} {'idle':>8} {'comm':>8} "
            f"{'exposed':>8}   (GPU ms per profiled step)"
        )
    for r in traced:
        for t in r["trace"]:
            name = f"{r['layout']} {t['label']}"
            if not t["gpu_events"]:
                print(f"{name:<36} no GPU kernel events")
                continue
            steps = max(len(t["step_ms"]), 1)
            host = sum(t["step_ms"].values()) / steps if t["step_ms"] else float("nan")
            cells = [t[k] / steps for k in ("busy_ms", "idle_ms", "comm_ms", "exposed_comm_ms")]
            print(f"{name:<36} {host:8.2f} " + " ".join(f"{c:8.2f}" for c in cells))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
