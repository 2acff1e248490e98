#!/usr/bin/env python3
"""Kernel benchmark: every registry op, forward + backward, triton vs eager vs torch.compile(eager).

For each op at a model-like shape (the hybrid-1b config of benchmarks/train_throughput.py:
hidden 2048, MLP 7168, Mamba d_inner 4096 in 8 groups, conv width 6144, 16 heads of 128,
vocabulary 131072; 4 x 1024 tokens by default) and each implementation:

- `eager` and `triton`: the registry's implementations (kernels/registry.py);
- `compile`: torch.compile of the eager implementation (inductor, default mode);

it times `--reps` forward + backward passes (torch.autograd.grad with fixed random output
gradients, after `--warmup` untimed ones; CUDA events on GPU) and reports the median (`ms`:
what an eager training step pays, host launch overhead included), the GPU kernel time per pass
(`kernel ms`: every kernel's duration summed from a torch.profiler trace of another `--reps`
passes; at these shapes most ops run for tens of microseconds, so `ms` is mostly Python and
launch overhead and only `kernel ms` says how good a kernel is), the peak memory above the
inputs, and, from `kernel ms` where it was measured (else from `ms`),

- memory-bound ops: achieved GB/s = the minimum bytes a fused forward + backward must move
  (each input, output and gradient read or written once; see `Case.bytes_moved`) / time,
  against the H100 SXM copy ceiling of 2.99 TB/s (`--peak-gbps`);
- linear_cross_entropy: achieved TFLOP/s = the three GEMMs' 6 N V H FLOPs / time, against the
  784 TFLOP/s H100 bf16 dense GEMM ceiling (`--peak-tflops`); plus the Triton op at other logits
  chunk budgets (CHUNK_BYTES of kernels/linear_cross_entropy/triton.py).

Activations are bfloat16 and parameters float32 (bf16 autocast's layout); the cross-entropy
runs as the trainer runs it, under bf16 autocast with float32 hidden states and weight.

An implementation that is unavailable (no triton, no GPU, TRITON_INTERPRET unset on CPU) or
fails (compile error, out of memory) is reported with its reason; the rest still run. Results
go to a table on stdout and, after every measurement, to `--out` as JSON.

SSD hook: if benchmarks/ssd.py exists and defines `results(device, args) -> list[dict]`, its
rows are included under "ssd" in the JSON (`--no-ssd` skips it).

    python benchmarks/kernels.py --out kernels.json                     # GPU, full shapes
    TRITON_INTERPRET=1 python benchmarks/kernels.py --small --reps 2    # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from profiling import kernel_breakdown  # benchmarks/profiling.py, beside this script
from timing import median_ms, synchronize  # benchmarks/timing.py, beside this script

from megatron_hybrid.kernels.registry import KernelError, resolve_kernels

H100_COPY_GBPS = 2990.0
H100_BF16_GEMM_TFLOPS = 784.0
EPS = 1e-5


@dataclasses.dataclass
class Case:
    """One op at one shape: how to build its inputs and what a fused pass must move."""

    op: str
    shape: str
    make: Callable[[torch.device], tuple[list, list[int]]]  # (arguments, indices needing grad)
    bytes_moved: int = 0  # memory-bound ops: minimum bytes of forward + backward
    flops: int = 0  # compute-bound ops: FLOPs of forward + backward
    autocast: bool = False


def _randn(*shape, dtype, device, scale=1.0, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


def build_cases(tokens: tuple[int, int], hidden: int, small: bool) -> list[Case]:
    """The op shapes of a hybrid-1b-like model (or tiny ones with `small`)."""
    batch, seq = tokens
    if small:
        batch, seq, hidden = 2, 16, 64
    n = batch * seq
    ffn = 7 * hidden // 2 if not small else 96  # 7168 at hidden 2048
    d_inner, groups, state = 2 * hidden, (8 if not small else 2), (128 if not small else 8)
    conv = d_inner + 2 * groups * state
    heads, head_dim = (hidden // 128, 128) if not small else (4, 16)
    vocab = 131072 if not small else 512
    bf16, fp32 = torch.bfloat16, torch.float32
    a = 2  # bytes of a bf16 activation

    def rms(device):
        return [
            _randn(batch, seq, hidden, dtype=bf16, device=device),
            _randn(hidden, dtype=fp32, device=device, seed=1),
            EPS,
        ], [0, 1]

    def add_rms(device):
        return [
            _randn(batch, seq, hidden, dtype=bf16, device=device),
            _randn(batch, seq, hidden, dtype=bf16, device=device, seed=1),
            _randn(hidden, dtype=fp32, device=device, seed=2),
            EPS,
        ], [0, 1, 2]

    def gated(device):
        return [
            _randn(batch, seq, d_inner, dtype=bf16, device=device),
            _randn(batch, seq, d_inner, dtype=bf16, device=device, seed=1),
            _randn(d_inner, dtype=fp32, device=device, seed=2),
            d_inner // groups,
            EPS,
        ], [0, 1, 2]

    def squared_relu(device):
        return [_randn(batch, seq, ffn, dtype=bf16, device=device)], [0]

    def swiglu(device):
        return [_randn(batch, seq, 2 * ffn, dtype=bf16, device=device)], [0]

    def conv1d(device):
        # x a slice of the packed in_proj output [z, xBC, dt], as the Mamba2 layer passes it;
        # bf16 weight and bias, as autocast hands them to F.conv1d (eager needs one dtype)
        packed = _randn(batch, seq, d_inner + conv + d_inner // 64, dtype=bf16, device=device)
        return [
            packed[..., d_inner : d_inner + conv],
            _randn(conv, 1, 4, dtype=bf16, device=device, seed=1, scale=0.5),
            _randn(conv, dtype=bf16, device=device, seed=2),
            "silu",
        ], [0, 1, 2]

    def rotary(device):
        from megatron_hybrid.layers.rotary import rotary_cos_sin

        cos, sin = rotary_cos_sin(seq, head_dim, 10000.0, device)
        # attention's q: (B, T, heads, D) in memory, seen as (B, heads, T, D)
        q = _randn(batch, seq, heads, head_dim, dtype=bf16, device=device).transpose(1, 2)
        return [q, cos, sin], [0]

    def linear_ce(device):
        generator = torch.Generator(device="cpu").manual_seed(3)
        labels = torch.randint(0, vocab, (n,), generator=generator).to(device)
        return [
            _randn(n, hidden, dtype=fp32, device=device),
            _randn(vocab, hidden, dtype=fp32, device=device, seed=1, scale=0.02),
            labels,
        ], [0, 1]

    bsh = f"{batch}x{seq}x"
    return [
        Case("rms_norm", f"{bsh}{hidden}", rms, bytes_moved=5 * n * hidden * a),
        Case("add_rms_norm", f"{bsh}{hidden}", add_rms, bytes_moved=8 * n * hidden * a),
        Case(
            "gated_rms_norm",
            f"{bsh}{d_inner} groups {groups}",
            gated,
            bytes_moved=8 * n * d_inner * a,
        ),
        Case("activation.squared_relu", f"{bsh}{ffn}", squared_relu, bytes_moved=5 * n * ffn * a),
        Case("activation.swiglu", f"{bsh}2x{ffn}", swiglu, bytes_moved=8 * n * ffn * a),
        Case("causal_conv1d", f"{bsh}{conv} k4 silu", conv1d, bytes_moved=5 * n * conv * a),
        Case(
            "rotary",
            f"{batch}x{heads}x{seq}x{head_dim}",
            rotary,
            bytes_moved=4 * n * heads * head_dim * a + 4 * seq * head_dim * 4,
        ),
        Case(
            "linear_cross_entropy",
            f"{n} tokens x {hidden} -> {vocab}",
            linear_ce,
            flops=6 * n * vocab * hidden,
            autocast=True,
        ),
    ]


# -- timing ---------------------------------------------------------------------------------------


def _fwd_bwd(
    fn: Callable, args: list, grad_indices: list[int], autocast: bool, device: torch.device
) -> Callable[[], None]:
    """A closure running fn forward and backward once (gradients of `grad_indices`)."""
    inputs = [args[i].detach().requires_grad_(True) for i in grad_indices]
    call_args = list(args)
    for i, tensor in zip(grad_indices, inputs, strict=True):
        call_args[i] = tensor
    context = (
        torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    )
    with context:
        probe = fn(*call_args)
    outputs = probe if isinstance(probe, tuple) else (probe,)
    grads = [torch.randn_like(out) for out in outputs]
    del probe, outputs

    def step() -> None:
        with context:
            out = fn(*call_args)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, inputs, grads)

    return step


def measure(
    step: Callable[[], None], warmup: int, reps: int, device: torch.device
) -> tuple[float, int | None]:
    """(median ms of `step`, peak bytes allocated above what was allocated before)."""
    for _ in range(warmup):  # here, not in the timer: the peak is that of the timed calls only
        step()
    synchronize(device)
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    ms = median_ms(step, warmup=0, repeat=reps, device=device)
    peak = None if base is None else torch.cuda.max_memory_allocated(device) - base
    return ms, peak


def kernel_time_ms(step: Callable[[], None], reps: int, device: torch.device) -> float | None:
    """GPU kernel time per call of `step`: every kernel's duration summed (None without device
    events, e.g. on CPU)."""
    total_us = sum(kernel_breakdown(step, reps, device).values())
    return total_us / 1e3 if total_us > 0 else None


def implementations(op: str, device: torch.device, names: list[str]) -> dict[str, Callable | str]:
    """impl name -> callable, or the reason it is unavailable."""
    found: dict[str, Callable | str] = {}
    eager = resolve_kernels({}, "eager", device)[op]
    for name in names:
        if name == "eager":
            found[name] = eager
        elif name == "compile":
            found[name] = torch.compile(eager, dynamic=False)
        else:
            try:
                found[name] = resolve_kernels({op: name}, "eager", device)[op]
            except KernelError as error:
                found[name] = f"unavailable: {error}"
    return found


@contextlib.contextmanager
def _chunk_budget(megabytes: int):
    """The Triton cross-entropy with logits chunks of up to `megabytes` (not capped at 1/8 of
    the float32 logits)."""
    from megatron_hybrid.kernels.linear_cross_entropy import triton as triton_linear_ce

    saved = triton_linear_ce.CHUNK_BYTES, triton_linear_ce._CHUNK_FRACTION
    triton_linear_ce.CHUNK_BYTES, triton_linear_ce._CHUNK_FRACTION = megabytes * 2**20, 1
    try:
        yield
    finally:
        triton_linear_ce.CHUNK_BYTES, triton_linear_ce._CHUNK_FRACTION = saved


def run_case(
    case: Case,
    impl: str,
    fn: Callable | str,
    args: argparse.Namespace,
    device: torch.device,
    peak_gbps: float,
    peak_tflops: float,
    context=contextlib.nullcontext,
) -> dict:
    row = dict(op=case.op, shape=case.shape, impl=impl)
    if isinstance(fn, str):
        return dict(row, error=fn)
    try:
        with context():
            inputs, grad_indices = case.make(device)
            step = _fwd_bwd(fn, inputs, grad_indices, case.autocast, device)
            ms, peak = measure(step, args.warmup, args.reps, device)
            row.update(median_ms=ms, peak_memory_bytes=peak)
            if not args.no_kernel_time:
                try:
                    row["kernel_ms"] = kernel_time_ms(step, args.reps, device)
                except Exception as error:  # the profiler is not essential
                    row["kernel_ms_error"] = f"{type(error).__name__}: {error}"[:300]
    except Exception as error:  # unavailable at run time, compile failure, out of memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        message = str(error).strip().splitlines()
        return dict(row, error=f"{type(error).__name__}: {message[0] if message else ''}"[:300])
    time_ms = row.get("kernel_ms") or ms
    if case.bytes_moved:
        row.update(
            bytes_moved=case.bytes_moved,
            gbps=case.bytes_moved / time_ms / 1e6,
            fraction_of_peak=case.bytes_moved / time_ms / 1e6 / peak_gbps,
        )
    if case.flops:
        row.update(
            flops=case.flops,
            tflops=case.flops / time_ms / 1e9,
            fraction_of_peak=case.flops / time_ms / 1e9 / peak_tflops,
        )
    return row


# -- SSD hook -------------------------------------------------------------------------------------


def ssd_results(device: torch.device, args: argparse.Namespace) -> list[dict] | str:
    """Rows from benchmarks/ssd.py's `results(device, args)`, or why there are none."""
    path = Path(__file__).with_name("ssd.py")
    if not path.exists():
        return "benchmarks/ssd.py does not exist"
    spec = importlib.util.spec_from_file_location("benchmark_ssd", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "results", None)):
            return "benchmarks/ssd.py defines no results(device, args); run it on its own"
        return list(module.results(device, args))
    except Exception as error:
        return f"benchmarks/ssd.py failed: {type(error).__name__}: {error}"[:300]


# -- report ---------------------------------------------------------------------------------------


def format_table(rows: list[dict], peak_gbps: float, peak_tflops: float) -> str:
    header = (
        f"{'op':<24} {'shape':<32} {'impl':<22} {'ms':>8} {'vs eager':>8} "
        f"{'kernel ms':>9} {'vs eager':>8} {'GB/s':>7} {'TFLOP/s':>8} {'of peak':>7} "
        f"{'peak MiB':>9}"
    )
    lines = [
        f"fwd+bwd: median wall ms, summed GPU kernel ms; GB/s and TFLOP/s from kernel ms "
        f"where measured; peaks {peak_gbps:.0f} GB/s copy, {peak_tflops:.0f} TFLOP/s GEMM",
        header,
        "-" * len(header),
    ]
    eager_ms = {
        (r["op"], r["shape"]): r["median_ms"]
        for r in rows
        if r["impl"] == "eager" and "median_ms" in r
    }
    eager_kernel_ms = {
        (r["op"], r["shape"]): r["kernel_ms"]
        for r in rows
        if r["impl"] == "eager" and r.get("kernel_ms")
    }
    for r in rows:
        lead = f"{r['op']:<24} {r['shape']:<32} {r['impl']:<22}"
        if "error" in r:
            lines.append(f"{lead} {r['error']}")
            continue
        base = eager_ms.get((r["op"], r["shape"]))
        speedup = f"{base / r['median_ms']:.2f}x" if base else "-"
        kernel_ms = r.get("kernel_ms")
        kernel_base = eager_kernel_ms.get((r["op"], r["shape"]))
        kernel = f"{kernel_ms:.3f}" if kernel_ms else "-"
        kernel_speedup = f"{kernel_base / kernel_ms:.2f}x" if kernel_ms and kernel_base else "-"
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else "-"
        tflops = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(
            f"{lead} {r['median_ms']:>8.3f} {speedup:>8} {kernel:>9} "
            f"{kernel_speedup:>8} {gbps:>7} {tflops:>8} "
            f"{100 * r['fraction_of_peak']:>6.1f}% {mem:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--tokens", default="4x1024", help="batch x sequence length (default 4x1024; e.g. 1x4096)"
    )
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    parser.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    parser.add_argument(
        "--impls",
        nargs="*",
        default=["triton", "eager", "compile"],
        help="implementations to time (default: triton eager compile)",
    )
    parser.add_argument(
        "--ce-chunk-mib",
        nargs="*",
        type=int,
        default=[128, 512],
        help="extra logits chunk budgets (MiB) for the Triton cross-entropy",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--peak-gbps", type=float, default=H100_COPY_GBPS)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_GEMM_TFLOPS)
    parser.add_argument("--no-ssd", action="store_true", help="skip benchmarks/ssd.py")
    parser.add_argument(
        "--no-kernel-time",
        action="store_true",
        help="skip the torch.profiler pass that sums GPU kernel time",
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    cases = [
        c
        for c in build_cases((batch, seq), args.hidden, args.small)
        if not args.ops or c.op in args.ops
    ]
    report: dict = dict(
        device=(
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        torch=torch.__version__,
        python=platform.python_version(),
        triton=_version("triton"),
        tokens=args.tokens,
        hidden=args.hidden,
        small=args.small,
        warmup=args.warmup,
        reps=args.reps,
        peak_gbps=args.peak_gbps,
        peak_tflops=args.peak_tflops,
        rows=[],
    )

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    # torch.compile last: its compile time dominates a run, so a run cut short still has the
    # Triton and eager numbers of every op.
    phases = [
        [impl for impl in args.impls if impl != "compile"],
        [impl for impl in args.impls if impl == "compile"],
    ]
    for phase in phases:
        for case in cases:
            runs = [
                (impl, fn, contextlib.nullcontext)
                for impl, fn in implementations(case.op, device, phase).items()
            ]
            if case.op == "linear_cross_entropy" and "triton" in phase:
                triton_fn = dict((impl, fn) for impl, fn, _ in runs)["triton"]
                for mib in args.ce_chunk_mib:
                    runs.append(
                        (f"triton[chunk<={mib}MiB]", triton_fn, lambda mib=mib: _chunk_budget(mib))
                    )
            for impl, fn, context in runs:
                row = run_case(
                    case, impl, fn, args, device, args.peak_gbps, args.peak_tflops, context
                )
                report["rows"].append(row)
                print(
                    format_table([row], args.peak_gbps, args.peak_tflops).splitlines()[-1],
                    flush=True,
                )
                save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    order = {case.op: i for i, case in enumerate(cases)}
    report["rows"].sort(key=lambda r: order[r["op"]])  # stable: impls keep their order
    if not args.no_ssd:
        report["ssd"] = ssd_results(device, args)
        save()
    print()
    print(format_table(report["rows"], args.peak_gbps, args.peak_tflops))
    if isinstance(report.get("ssd"), str):
        print(f"ssd: {report['ssd']}")
    return 0


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
