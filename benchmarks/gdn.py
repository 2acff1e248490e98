#!/usr/bin/env python3
"""Gated DeltaNet's chunked gated delta rule, forward + backward: every implementation of the
registry's `gated_delta_rule` op (eager, triton, fla, and any other registered later) timed in
the same run on the same inputs.

The shape is Qwen3-Next's linear-attention layer (Megatron-Core's GDN defaults): 2 x 4096
tokens, 16 query/key heads of 128, 32 value heads of 128, chunks of 64. Operands are what the
layer hands the op under bf16 autocast: L2-normalized bf16 q and k, bf16 v and beta, float32
log decays g at Megatron's initial rates (A in [1, 16], dt_bias 1). Each timing is the median of
`--reps` passes (CUDA events on GPU, benchmarks/timing.py) after `--warmup` untimed ones; a pass
is the op and torch.autograd.grad of q, k, v, g and beta under a fixed random output gradient.

Also per implementation: the forward alone, the peak memory above the inputs (CUDA), and how far
its output and gradients are from the eager op's in float32 (max |impl - eager| / max |eager|).
An implementation that cannot run here (fla without CUDA or not installed; triton on CPU without
TRITON_INTERPRET=1) is a row with the reason; the rest still run. Results go to a table on
stdout and, after every row, to `--out` as JSON.

    python benchmarks/gdn.py --out gdn.json            # one GPU, the Qwen3-Next shape
    TRITON_INTERPRET=1 python benchmarks/gdn.py --small --reps 1 --warmup 0   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_ms  # benchmarks/timing.py, beside this script

from megatron_hybrid.kernels.registry import REGISTRY, KernelError

OP = "gated_delta_rule"


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seqlen: int
    key_heads: int
    value_heads: int
    key_dim: int = 128
    value_dim: int = 128

    @property
    def name(self) -> str:
        return (
            f"B{self.batch} T{self.seqlen} H{self.key_heads}x{self.key_dim} "
            f"HV{self.value_heads}x{self.value_dim}"
        )


QWEN3_NEXT = Shape(batch=2, seqlen=4096, key_heads=16, value_heads=32)
SMALL = Shape(batch=1, seqlen=100, key_heads=2, value_heads=4, key_dim=16, value_dim=16)
NAMES = ("q", "k", "v", "g", "beta")


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype):
    """The operands (q, k, v, g, beta) and an output gradient, as the layer produces them."""
    gen = torch.Generator().manual_seed(0)
    b, t, h, hv = shape.batch, shape.seqlen, shape.key_heads, shape.value_heads

    def randn(*size):
        return torch.randn(*size, generator=gen)

    q = F.normalize(randn(b, t, h, shape.key_dim), dim=-1)
    k = F.normalize(randn(b, t, h, shape.key_dim), dim=-1)
    v = randn(b, t, hv, shape.value_dim)
    A = torch.empty(hv).uniform_(1.0, 16.0, generator=gen)
    g = -A * F.softplus(randn(b, t, hv) + 1.0)
    beta = torch.sigmoid(randn(b, t, hv))
    operands = [x.to(device, dtype) for x in (q, k, v)] + [
        g.to(device, torch.float32),
        beta.to(device, dtype),
    ]
    return operands, randn(b, t, hv, shape.value_dim).to(device, dtype)


def fwd_bwd_step(fn: Callable, operands: list, do: torch.Tensor) -> Callable:
    leaves = [x.detach().requires_grad_() for x in operands]

    def step():
        o, _ = fn(*leaves)
        torch.autograd.grad(o, leaves, do)

    return step


def fwd_step(fn: Callable, operands: list) -> Callable:
    def step():
        with torch.no_grad():
            fn(*operands)

    return step


def outputs_and_gradients(fn: Callable, operands: list, do: torch.Tensor) -> dict:
    leaves = [x.detach().requires_grad_() for x in operands]
    o, _ = fn(*leaves)
    grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
    return {"o": o.float(), **{f"d{n}": g.float() for n, g in zip(NAMES, grads, strict=True)}}


def deviation(got: dict, want: dict) -> dict[str, float]:
    """max |got - want| / max |want| per tensor."""
    return {k: ((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want}


def peak_memory_mib(step: Callable, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def implementations(device: torch.device) -> dict[str, Callable | str]:
    """Every registered implementation of the op: its function, or why it cannot run here."""
    out: dict[str, Callable | str] = {}
    for name, impl in REGISTRY.implementations(OP).items():
        reason = impl.unavailable_reason(device)
        if reason is None:
            try:
                out[name] = impl.load()
            except KernelError as error:
                reason = str(error)
        if reason is not None:
            out[name] = reason
    return out


def _error(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def results(device, shape, dtype, args, report, save) -> list[dict]:
    """One row per implementation: fwd+bwd and forward median ms, peak memory, deviation from
    eager; or why it did not run."""
    operands, do = make_inputs(shape, device, dtype)
    reference = outputs_and_gradients(
        REGISTRY.implementations(OP)["eager"].load(), [x.float() for x in operands], do.float()
    )
    rows = report["rows"]
    for name, fn in implementations(device).items():
        row = dict(op=OP, shape=shape.name, dtype=str(dtype).removeprefix("torch."), impl=name)
        if isinstance(fn, str):
            row["skipped"] = fn
        else:
            try:
                step = fwd_bwd_step(fn, operands, do)
                row["median_ms"] = median_ms(
                    step, warmup=args.warmup, repeat=args.reps, device=device
                )
                row["fwd_median_ms"] = median_ms(
                    fwd_step(fn, operands), warmup=args.warmup, repeat=args.reps, device=device
                )
                row["peak_mib"] = peak_memory_mib(step, device)
                got = outputs_and_gradients(fn, operands, do)
                row["max_rel_deviation_from_eager_float32"] = deviation(got, reference)
            except Exception as error:  # out of memory, a kernel that fails to compile
                row["error"] = _error(error)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row), flush=True)
        save()
    return rows


HEADER = f"{'impl':<10} {'fwd+bwd ms':>10} {'fwd ms':>8} {'peak MiB':>9}   worst deviation"


def format_row(row: dict) -> str:
    lead = f"{row['impl']:<10}"
    if "skipped" in row or "error" in row:
        return f"{lead} {row.get('skipped') or row['error']}"
    peak = f"{row['peak_mib']:9.0f}" if row["peak_mib"] is not None else f"{'-':>9}"
    worst = max(row["max_rel_deviation_from_eager_float32"].items(), key=lambda kv: kv[1])
    return (
        f"{lead} {row['median_ms']:10.3f} {row['fwd_median_ms']:8.3f} {peak}   "
        f"{worst[1]:.1e} ({worst[0]})"
    )


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="a tiny shape (CPU smoke run)")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        help="q, k, v and beta (default: bfloat16 on CUDA, float32 elsewhere)",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SMALL if args.small or device.type != "cuda" else QWEN3_NEXT
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    report: dict = dict(
        benchmark="gdn",
        device=(
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        torch=torch.__version__,
        fla_core=_version("fla-core"),
        triton=_version("triton"),
        shape=dataclasses.asdict(shape),
        chunk_size=64,
        warmup=args.warmup,
        reps=args.reps,
        rows=[],
    )

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    print(f"{OP} fwd+bwd at {shape.name}, {str(dtype).removeprefix('torch.')}, {device.type}")
    print(HEADER)
    results(device, shape, dtype, args, report, save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
