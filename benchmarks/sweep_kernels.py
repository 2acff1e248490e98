#!/usr/bin/env python3
"""Launch-configuration sweep of the memory-bound Triton kernels (norms, causal conv1d).

Each kernel module keeps its CUDA launch configuration in a `GPU_TUNING` dict
(kernels/norms/triton.py, kernels/conv1d/triton.py). For every op at the hybrid-1b training shape
(benchmarks/kernels.py's cases, 2 x 4096 tokens by default; the conv input is a strided slice of
the packed in_proj output, as the Mamba2 layer passes it) this tries each override in `SWEEP`,
checks that forward and gradients agree with the default configuration's (only the order of the
float32 weight-gradient sums may differ), and reports the GPU kernel time of one forward + backward
(every kernel's duration summed from a torch.profiler trace, weight-gradient partial sums
included) and the achieved bandwidth against the measured device copy bandwidth; for the default
configuration also each kernel's share.

    python benchmarks/sweep_kernels.py --out sweep.json [--tokens 2x4096] [--ops causal_conv1d]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from profiling import kernel_breakdown  # benchmarks/profiling.py, beside this script
from timing import median_ms  # benchmarks/timing.py, beside this script

from megatron_hybrid.kernels.conv1d import triton as triton_conv1d
from megatron_hybrid.kernels.norms import triton as triton_norms
from megatron_hybrid.kernels.registry import resolve_kernels

_HERE = Path(__file__).resolve().parent

SWEEP: dict[str, list[dict[str, int]]] = {
    "causal_conv1d": [
        {},
        {"time": 64, "bwd_time": 128},
        {"block_c": 128, "warps": 1, "bwd_block_c": 128, "bwd_warps": 1},
        {"block_c": 512, "warps": 4, "bwd_block_c": 512, "bwd_warps": 4},
    ],
    "norms": [
        {},
        {"bwd_programs_per_sm": 4},
        {"bwd_programs_per_sm": 16},
        {"bwd_tile": 2048},
        {"bwd_per_warp": 512},
        # Fewer backward programs (fewer float32 weight-gradient partials to sum afterwards)
        # with as many warps per multiprocessor: two rows per tile.
        {"bwd_tile": 4096, "bwd_per_warp": 1024, "bwd_programs_per_sm": 4},
        {"bwd_tile": 4096, "bwd_per_warp": 512, "bwd_programs_per_sm": 2},
        {"bwd_tile": 2048, "bwd_per_warp": 512, "bwd_programs_per_sm": 4},
        {"bwd_programs_per_sm": 4, "bwd_per_warp": 512},
        # Around the best of those on an H100 (2 programs of 8 warps per multiprocessor).
        {"bwd_tile": 4096, "bwd_per_warp": 512, "bwd_programs_per_sm": 1},
        {"bwd_tile": 8192, "bwd_per_warp": 512, "bwd_programs_per_sm": 1},
        {"bwd_tile": 4096, "bwd_per_warp": 256, "bwd_programs_per_sm": 2},
    ],
    # The gated norm's backward has launch settings of its own (short groups).
    "gated_rms_norm": [
        {},
        {"gated_bwd_programs_per_sm": 16},
        {"gated_bwd_per_warp": 512},
        {"gated_bwd_per_warp": 512, "gated_bwd_programs_per_sm": 4},
        {"gated_bwd_tile": 4096, "gated_bwd_per_warp": 512, "gated_bwd_programs_per_sm": 2},
    ],
}
_MODULES = {
    "causal_conv1d": triton_conv1d,
    "rms_norm": triton_norms,
    "add_rms_norm": triton_norms,
    "gated_rms_norm": triton_norms,
}


def _kernels_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", _HERE / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def copy_gbps(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 20."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    return 2 * nbytes / median_ms(lambda: b.copy_(a), warmup=3, repeat=20, device=device) / 1e6


def _results(step_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().float().clone() for t in step_outputs]


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        for x, y in zip(a, b, strict=True)
    )


def sweep_case(bench, case, overrides, args, device, peak_gbps) -> list[dict]:
    module = _MODULES[case.op]
    fn = resolve_kernels({case.op: "triton"}, "eager", device)[case.op]
    inputs, grad_indices = case.make(device)
    bytes_moved = case.bytes_moved
    if args.fp32_norm_inputs and case.op in ("rms_norm", "add_rms_norm"):
        # Under bf16 autocast the residual stream, and so these norms' inputs, outputs and
        # gradients, are float32: twice the bytes.
        inputs = [t.float() if isinstance(t, torch.Tensor) else t for t in inputs]
        bytes_moved *= 2
    leaves = [inputs[i].detach().requires_grad_(True) for i in grad_indices]
    call = list(inputs)
    for i, leaf in zip(grad_indices, leaves, strict=True):
        call[i] = leaf
    probe = fn(*call)
    grads = [torch.randn_like(t) for t in (probe if isinstance(probe, tuple) else (probe,))]
    del probe

    def run() -> list[torch.Tensor]:
        out = fn(*call)
        out = out if isinstance(out, tuple) else (out,)
        return [*out, *torch.autograd.grad(out, leaves, grads)]

    default = dict(module.GPU_TUNING)
    reference = None
    rows = []
    for override in overrides:
        module.GPU_TUNING.update(override)
        row = dict(op=case.op, shape=case.shape, tuning=override)
        try:
            got = _results(run())
            if reference is None:
                reference = got
            row["max_rel_diff_vs_default"] = _max_rel(got, reference)
            for _ in range(args.warmup):
                run()
            ms = bench.kernel_time_ms(run, args.reps, device)
            row.update(
                kernel_ms=ms,
                gbps=bytes_moved / ms / 1e6,
                fraction_of_copy=bytes_moved / ms / 1e6 / peak_gbps,
            )
            if not override:  # where the default configuration's time goes
                row["kernels_us"] = kernel_breakdown(run, args.reps, device)
        except Exception as error:  # a configuration that does not compile or fit
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        finally:
            module.GPU_TUNING.clear()
            module.GPU_TUNING.update(default)
        rows.append(row)
        print(format_row(row), flush=True)
        for kernel, us in row.get("kernels_us", {}).items():
            print(f"{'':>18}{us:8.1f} us  {kernel[:80]}")
    return rows


def format_row(row: dict) -> str:
    lead = f"{row['op']:<16} {row['shape']:<30} {json.dumps(row['tuning']):<62}"
    if "error" in row:
        return f"{lead} {row['error']}"
    return (
        f"{lead} {1e3 * row['kernel_ms']:8.1f} us {row['gbps']:6.0f} GB/s "
        f"{100 * row['fraction_of_copy']:5.1f}%  diff {row['max_rel_diff_vs_default']:.1e}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tokens", default="2x4096", help="batch x sequence (default 2x4096)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ops", nargs="*", default=list(_MODULES))
    parser.add_argument(
        "--fp32-norm-inputs",
        action="store_true",
        help="float32 inputs for rms_norm and add_rms_norm (the model's residual "
        "stream under autocast)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_kernels.py needs a CUDA GPU (launch configurations are CUDA-only)")
        return 1
    device = torch.device("cuda")
    bench = _kernels_benchmark()
    batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    cases = {c.op: c for c in bench.build_cases((batch, seq), args.hidden, small=False)}
    peak = copy_gbps(device)
    print(f"{torch.cuda.get_device_name(device)}: copy {peak:.0f} GB/s (read + write)")
    report = dict(
        device=torch.cuda.get_device_name(device),
        copy_gbps=peak,
        tokens=args.tokens,
        hidden=args.hidden,
        rows=[],
    )
    for op in args.ops:
        overrides = SWEEP[op if op in ("causal_conv1d", "gated_rms_norm") else "norms"]
        report["rows"] += sweep_case(bench, cases[op], overrides, args, device, peak)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
