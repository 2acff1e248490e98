#!/usr/bin/env python3
"""FP8 against bf16 over a whole training run on real text: does FP8 keep the loss?

Runs `scripts/pretrain_hybrid.py` twice on the embedded corpus (English prose and code, byte
tokens, held-out validation documents) with one of benchmarks/train_throughput.py's model
configs, the same seed, data order and schedule: once in bf16, once adding `--fp8-format` /
`--fp8-recipe`. It then compares, at the end of the run,

- the training loss averaged over the last `--tail` logged iterations (one iteration's loss is
  one batch's: the average takes out the batch-to-batch noise both runs share), and
- the validation loss of the final evaluation,

as relative differences (fp8 - bf16) / bf16, against `--tolerance` (1% by default). It prints
both loss curves side by side and writes everything to `--out` as JSON, including each run's
tokens/s from the training script's own log.

    python benchmarks/fp8_loss.py --config hybrid-1b --iters 300 --out fp8_loss.json

One GPU (FP8 needs CUDA with compute capability 8.9+ and torchao). Extra training flags go
after `--` and reach both runs (e.g. `-- --compile`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import Stopwatch  # benchmarks/timing.py, beside this script
from train_throughput import (
    CONFIGS,
    split_training_flags,
)  # benchmarks/train_throughput.py, beside this script

_ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = _ROOT / "scripts" / "pretrain_hybrid.py"


def run_training(flags: list[str], log_dir: Path, label: str) -> dict:
    """One training run; its metrics.jsonl records and wall time."""
    command = [sys.executable, str(_SCRIPT), *flags, "--log-dir", str(log_dir)]
    print(f"[{label}] {' '.join(command)}", flush=True)
    stopwatch = Stopwatch()
    done = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True)
    wall = stopwatch.elapsed_s()
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"[{label}] the training run failed (exit {done.returncode}):\n{tail}")
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"[{label}] done in {wall:.0f} s", flush=True)
    return dict(records=records, wall_s=round(wall, 1))


def summarize(records: list[dict], tail: int) -> dict:
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "val_loss" in r]
    rates = [r["tokens_per_sec"] for r in train[1:]]  # the first interval holds start-up
    return dict(
        final_iteration=train[-1]["iteration"],
        tail_train_loss=statistics.fmean(r["loss"] for r in train[-tail:]),
        final_val_loss=valid[-1]["val_loss"] if valid else None,
        median_tokens_per_s=statistics.median(rates) if rates else None,
    )


def relative(fp8: float | None, bf16: float | None) -> float | None:
    return None if fp8 is None or bf16 is None else (fp8 - bf16) / bf16


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_training_flags(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="hybrid-1b", choices=sorted(CONFIGS))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--fp8-format", default="hybrid", choices=["e4m3", "hybrid"])
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument(
        "--tail", type=int, default=5, help="logged iterations averaged at the end (default 5)"
    )
    parser.add_argument("--eval-iters", type=int, default=4)
    parser.add_argument(
        "--tolerance", type=float, default=0.01, help="largest |relative difference| (0.01)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.iters < args.log_interval * args.tail:
        parser.error(
            f"--iters {args.iters} logs fewer than --tail {args.tail} iterations at "
            f"--log-interval {args.log_interval}; give at least {args.log_interval * args.tail}"
        )

    common = [
        *CONFIGS[args.config].model_flags(),
        "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size),
        "--train-iters", str(args.iters),
        "--lr", str(args.lr),
        "--min-lr", f"{args.lr / 10:g}",
        "--lr-warmup-iters", str(max(1, args.iters // 10)),
        "--lr-decay-style", "cosine",
        "--bf16",
        "--log-interval", str(args.log_interval),
        "--eval-interval", str(args.iters),
        "--eval-iters", str(args.eval_iters),
        *extra,
    ]  # fmt: skip
    fp8 = ["--fp8-format", args.fp8_format, "--fp8-recipe", args.fp8_recipe]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        # FP8 first: where it cannot run, the script stops before the bf16 run's time is spent.
        runs["fp8"] = run_training(common + fp8, Path(tmp) / "fp8", "fp8")
        runs["bf16"] = run_training(common, Path(tmp) / "bf16", "bf16")

    summary = {name: summarize(run["records"], args.tail) for name, run in runs.items()}
    checks = {
        key: relative(summary["fp8"][key], summary["bf16"][key])
        for key in ("tail_train_loss", "final_val_loss")
    }
    within = all(v is not None and abs(v) <= args.tolerance for v in checks.values())

    curves = {
        name: {r["iteration"]: r["loss"] for r in run["records"] if "loss" in r}
        for name, run in runs.items()
    }
    print(f"\n{'iteration':>9} {'bf16 loss':>10} {'fp8 loss':>10}")
    for iteration in sorted(curves["bf16"]):
        print(
            f"{iteration:9d} {curves['bf16'][iteration]:10.4f} "
            f"{curves['fp8'].get(iteration, float('nan')):10.4f}"
        )
    for key, value in checks.items():
        print(
            f"{key}: bf16 {summary['bf16'][key]:.4f}  fp8 {summary['fp8'][key]:.4f}  "
            f"relative {100 * value:+.2f}% (tolerance {100 * args.tolerance:.1f}%)"
            if value is not None
            else f"{key}: missing"
        )
    print(
        f"tokens/s: bf16 {summary['bf16']['median_tokens_per_s']:.0f}, "
        f"fp8 {summary['fp8']['median_tokens_per_s']:.0f}"
    )
    print("FP8 keeps the loss" if within else "FP8 does NOT keep the loss within the tolerance")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                dict(
                    benchmark="fp8_loss",
                    config=args.config,
                    settings=vars(args) | {"out": str(args.out), "extra": extra},
                    fp8=fp8,
                    common_flags=common,
                    summary=summary,
                    relative_difference=checks,
                    within_tolerance=within,
                    runs=runs,
                ),
                indent=2,
            )
        )
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
