#!/usr/bin/env python3
"""Training throughput of named hybrid models: tokens/s, MFU and peak memory per config.

For every config: build the training script's Trainer on one device (random token data, no
dataset; the model parallelized by `parallelize`, its AdamW and schedule), bf16 autocast on CUDA
(fp32 on CPU), run `--warmup` untimed steps then `--steps` timed ones of the trainer's own
`train_step` (forward, cross-entropy, backward, gradient clipping, the non-finite check,
optimizer step; benchmarks/timing.py times each on its own), and report the median step time,
tokens/s, MFU and peak memory (torch.cuda.max_memory_allocated, reset per config). A config that
fails (e.g. out of memory) is reported and the rest still run.

    MFU = training_flops_per_token(config, seq) * tokens/s / peak
    peak = 989.4 TFLOP/s, the H100 SXM bf16 dense spec (override with --peak-tflops);
           on CPU there is no peak and MFU prints n/a.

FLOPs per token are model FLOPs from the parsed pattern (megatron_hybrid/flops.py documents the
formula), so the fused and unfused layout of one model have the same numerator and differ only
in measured time.

    python benchmarks/train_throughput.py                       # every GPU config
    python benchmarks/train_throughput.py --config cpu-smoke --steps 2 --warmup 1 --json out.json
    python benchmarks/train_throughput.py --config hybrid-1b --compile --fp8-format hybrid

`--fp8-format` / `--fp8-recipe` convert the blocks' dense GEMMs to FP8 in the same `parallelize`
step as the training script (CUDA, compute capability 8.9+, torchao); MFU stays against the bf16
peak, so bf16 and FP8 runs of a config compare directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys

import torch
from profiling import kernel_breakdown, kernel_category  # benchmarks/profiling.py, beside this
from timing import Stopwatch, call_times_ms, synchronize  # benchmarks/timing.py, beside this

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.flops import parameter_count, peak_bf16_tflops, training_flops_per_token
from megatron_hybrid.kernels import resolve_kernels
from megatron_hybrid.kernels.float8 import (
    DEFAULT_FP8_RECIPE,
    FP8_FORMATS,
    RECIPE_CHOICES,
    fp8_choice_problem,
)
from megatron_hybrid.parallel.dims import ParallelDims
from megatron_hybrid.parallel.parallelize import ParallelSettings
from megatron_hybrid.pattern import CHANNEL_MIXERS, SEQUENCE_MIXERS
from megatron_hybrid.training.settings import TrainingSettings
from megatron_hybrid.training.trainer import Trainer

# MFU's default denominator on CUDA: the H100 SXM's, so H100 and H200 numbers compare (the
# same peak); the one table of peaks is megatron_hybrid/flops.py's.
H100_SXM_BF16_DENSE_TFLOPS = peak_bf16_tflops("H100")


def split_training_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(a launching benchmark's own arguments, the training-script flags after `--`) of a
    command line: benchmarks that launch scripts/pretrain_hybrid.py hand those to every run."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def fuse_pattern(pattern: str) -> str:
    """Group every sequence mixer directly followed by a channel mixer: "M-M*-M" ->
    "[M-][M-]M[*-]M" (same canonical sub-layers, fewer physical blocks). Plain patterns only."""
    out, i = [], 0
    while i < len(pattern):
        if (
            i + 1 < len(pattern)
            and pattern[i] in SEQUENCE_MIXERS
            and pattern[i + 1] in CHANNEL_MIXERS
        ):
            out.append(f"[{pattern[i : i + 2]}]")
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    model: dict  # ModelConfig fields
    seq_length: int
    micro_batch: int
    gpu: bool = True  # part of the default set (the GPU configs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    def model_flags(self) -> list[str]:
        """scripts/pretrain_hybrid.py's flags for this model (other benchmarks launch the
        training script on these configs). The vocabulary is left to the tokenizer."""
        flags = ["--hybrid-layer-pattern", self.model["hybrid_layer_pattern"]]
        if self.model.get("activation") in ("squared_relu", "swiglu"):
            flags.append(f"--{self.model['activation'].replace('_', '-')}")
        for field, value in self.model.items():
            if field not in ("vocab_size", "activation", "hybrid_layer_pattern"):
                flags += [f"--{field.replace('_', '-')}", str(value)]
        return flags


_CI_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
_CI = dict(
    hidden_size=1024,
    vocab_size=50304,
    ffn_hidden_size=4096,
    activation="squared_relu",
    num_attention_heads=16,
    num_query_groups=8,
    mamba_num_heads=32,
    mamba_head_dim=64,
    mamba_num_groups=8,
    mamba_state_dim=128,
)
# Nemotron-H style (mostly Mamba2 + squared-ReLU MLP, ~1/9 attention, no position embedding),
# Nemotron-H's 131072 vocabulary with tied embeddings (untied would add 268M parameters).
_1B_PATTERN = "M-M-M*-M-M-M*-M-M-M*-M-M-M-"
_1B = dict(
    hidden_size=2048,
    vocab_size=131072,
    ffn_hidden_size=7168,
    activation="squared_relu",
    num_attention_heads=16,
    num_query_groups=8,
    kv_channels=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    mamba_num_groups=8,
    mamba_state_dim=128,
)
_SMOKE_PATTERN = "M-*-"
_SMOKE = dict(
    hidden_size=64,
    vocab_size=256,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    mamba_num_heads=4,
    mamba_head_dim=32,
    mamba_num_groups=2,
    mamba_state_dim=16,
    mamba_chunk_size=16,
)

CONFIGS = {
    c.name: c
    for c in (
        BenchConfig("megatron-ci-hybrid", dict(_CI, hybrid_layer_pattern=_CI_PATTERN), 1024, 4),
        BenchConfig(
            "megatron-ci-hybrid-fused",
            dict(_CI, hybrid_layer_pattern=fuse_pattern(_CI_PATTERN)),
            1024,
            4,
        ),
        BenchConfig("hybrid-1b", dict(_1B, hybrid_layer_pattern=_1B_PATTERN), 4096, 2),
        BenchConfig(
            "hybrid-1b-fused", dict(_1B, hybrid_layer_pattern=fuse_pattern(_1B_PATTERN)), 4096, 2
        ),
        BenchConfig(
            "cpu-smoke", dict(_SMOKE, hybrid_layer_pattern=_SMOKE_PATTERN), 64, 2, gpu=False
        ),
        BenchConfig(
            "cpu-smoke-fused",
            dict(_SMOKE, hybrid_layer_pattern=fuse_pattern(_SMOKE_PATTERN)),
            64,
            2,
            gpu=False,
        ),
    )
}


def run_config(
    bench: BenchConfig, args: argparse.Namespace, device: torch.device, peak_flops: float | None
) -> dict:
    config = bench.model_config()
    params = parameter_count(config)
    flops_per_token = training_flops_per_token(config, bench.seq_length)
    tokens_per_step = bench.micro_batch * bench.seq_length
    result = dict(
        config=bench.name,
        pattern=config.hybrid_layer_pattern,
        num_blocks=config.pattern.num_blocks,
        num_layers=config.pattern.num_layers,
        parameters=params,
        seq_length=bench.seq_length,
        micro_batch=bench.micro_batch,
        tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_token,
        kernels=args.kernels,
        compile=args.compile and (args.compile_mode or "default"),
        recompute=args.recompute_granularity,
        dtype="bf16-autocast" if device.type == "cuda" else "fp32",
        fp8=args.fp8_format and f"{args.fp8_format}/{args.fp8_recipe}",
        steps=args.steps,
        warmup=args.warmup,
        clip_grad=args.clip_grad,
        nan_check=args.check_for_nan_in_loss_and_grad,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kernels = resolve_kernels({}, args.kernels, device)
    result["kernels_bound"] = kernels.describe()
    trainer = Trainer(
        config,
        _training_settings(bench, args, device),
        ParallelSettings(
            compile=args.compile,
            compile_mode=args.compile_mode,
            recompute_granularity=args.recompute_granularity,
            fp8_format=args.fp8_format,
            fp8_recipe=args.fp8_recipe,
        ),
        ParallelDims(world_size=1),
        None,
        device,
        kernels,
        num_micro_batches=1,
        log=lambda _: None,
    )
    assert trainer.num_parameters == params, (trainer.num_parameters, params)
    generator = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(
        0, config.vocab_size, (bench.micro_batch, bench.seq_length + 1), generator=generator
    ).to(device)
    iteration = 0

    def step() -> None:
        # The loss through the model's bound linear_cross_entropy (fused under --kernels auto).
        nonlocal iteration
        iteration += 1
        trainer.train_step(iteration, [data])

    times = [
        ms / 1e3 for ms in call_times_ms(step, warmup=args.warmup, repeat=args.steps, device=device)
    ]
    trainer.settle()  # a non-finite last step stops here, as it would stop a run
    if args.profile and device.type == "cuda":
        _print_profile(step, device, bench.name)
    median = statistics.median(times)
    tokens_per_s = tokens_per_step / median
    result.update(
        step_times_s=times,
        update="on the device" if trainer.update_on_device else "host-checked",
        median_step_s=median,
        tokens_per_s=tokens_per_s,
        achieved_tflops=flops_per_token * tokens_per_s / 1e12,
        mfu=None if peak_flops is None else flops_per_token * tokens_per_s / peak_flops,
        peak_memory_bytes=(
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
    )
    return result


def _training_settings(
    bench: BenchConfig, args: argparse.Namespace, device: torch.device
) -> TrainingSettings:
    """One micro-batch per step, bf16 autocast on CUDA, AdamW at a constant 1e-4 with weight
    decay 0.1; clipping and the non-finite check as the flags say (the training script's
    defaults unless turned off, to show what they cost)."""
    return TrainingSettings(
        seq_length=bench.seq_length,
        micro_batch_size=bench.micro_batch,
        global_batch_size=bench.micro_batch,
        lr=1e-4,
        min_lr=1e-4,
        lr_warmup_iters=0,
        lr_decay_style="constant",
        bf16=device.type == "cuda",
        seed=1234,
        clip_grad=args.clip_grad,
        check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
    )


def _print_profile(step, device: torch.device, name: str, steps: int = 3) -> None:
    """Where the time of `steps` steps goes: every GPU kernel's duration from a torch.profiler
    trace, summed per category and per kernel (kernels inside CUDA graphs may not be traced:
    profile without --compile-mode reduce-overhead for the full picture)."""
    synchronize(device)
    stopwatch = Stopwatch()
    per_kernel = {kernel: us / 1e3 for kernel, us in kernel_breakdown(step, steps, device).items()}
    wall_ms = 1e3 * stopwatch.elapsed_s() / steps
    per_category: dict[str, float] = {}
    for kernel, ms in per_kernel.items():
        category = kernel_category(kernel)
        per_category[category] = per_category.get(category, 0.0) + ms
    busy = sum(per_kernel.values())
    print(
        f"\nprofile {name}: {wall_ms:.1f} ms per step wall (profiled), GPU kernels "
        f"{busy:.1f} ms per step ({100 * busy / wall_ms:.0f}% busy)"
    )
    for category, ms in sorted(per_category.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:8.2f} ms  {100 * ms / busy:5.1f}%  {category}")
    print("  top kernels (ms per step):")
    for kernel, ms in list(per_kernel.items())[:25]:  # largest first
        print(f"  {ms:8.2f}  {kernel_category(kernel):<14} {kernel[:90]}")


def _table(results: list[dict]) -> str:
    header = (
        f"{'config':<26} {'params':>8} {'GFLOP/tok':>9} {'step ms':>9} {'tokens/s':>11} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:<26} failed: {r['error']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        lines.append(
            f"{r['config']:<26} {r['parameters'] / 1e6:>7.1f}M {r['flops_per_token'] / 1e9:>9.3f} "
            f"{1e3 * r['median_step_s']:>9.2f} {r['tokens_per_s']:>11.0f} "
            f"{r['achieved_tflops']:>8.2f} {mfu:>6} {mem:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        choices=sorted(CONFIGS),
        default=None,
        help="named config, repeatable (default: every GPU config: "
        + ", ".join(n for n, c in CONFIGS.items() if c.gpu)
        + ")",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument(
        "--kernels",
        choices=("auto", "eager"),
        default="auto",
        help="kernel binding (megatron_hybrid.kernels.resolve_kernels)",
    )
    parser.add_argument(
        "--recompute-granularity",
        choices=("full", "selective"),
        default=None,
        help="activation checkpointing per block, as the training script's",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode with --compile (e.g. reduce-overhead)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile 3 steps per config and print the top GPU kernels",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="accelerator peak for MFU (default on CUDA: "
        f"{H100_SXM_BF16_DENSE_TFLOPS}, H100 SXM bf16 dense)",
    )
    parser.add_argument(
        "--clip-grad",
        type=float,
        default=1.0,
        help="gradient clipping as the training script's flag (0 turns it off; default 1.0)",
    )
    parser.add_argument(
        "--check-for-nan-in-loss-and-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the training script's per-step non-finite check (a host synchronization)",
    )
    parser.add_argument(
        "--fp8-format",
        choices=FP8_FORMATS,
        default=None,
        help="the blocks' dense GEMMs in FP8, as the training script's flag (default: off)",
    )
    parser.add_argument(
        "--fp8-recipe",
        choices=RECIPE_CHOICES,
        default=DEFAULT_FP8_RECIPE,
        help=f"FP8 scaling with --fp8-format, as the training script's (default "
        f"{DEFAULT_FP8_RECIPE})",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.fp8_format is not None and fp8_choice_problem(args.fp8_format, args.fp8_recipe):
        parser.error(fp8_choice_problem(args.fp8_format, args.fp8_recipe))
    names = args.config or [n for n, c in CONFIGS.items() if c.gpu]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.peak_tflops is not None:
        peak_flops = args.peak_tflops * 1e12
    elif device.type == "cuda":
        peak_flops = H100_SXM_BF16_DENSE_TFLOPS * 1e12
    else:
        peak_flops = None
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    peak_text = "n/a" if peak_flops is None else f"{peak_flops / 1e12:g} TFLOP/s"
    print(
        f"device: {device} ({device_name}), torch {torch.__version__}, MFU peak: {peak_text}",
        flush=True,
    )

    results = []
    for name in names:
        try:
            results.append(run_config(CONFIGS[name], args, device, peak_flops))
        except Exception as error:  # report it and go on with the other configs
            results.append(dict(config=name, error=f"{type(error).__name__}: {error}"))
        gc.collect()  # free this config's model and optimizer before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"done {name}", file=sys.stderr, flush=True)
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    device=str(device),
                    device_name=device_name,
                    torch=torch.__version__,
                    peak_tflops=None if peak_flops is None else peak_flops / 1e12,
                    results=results,
                ),
                f,
                indent=2,
            )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
