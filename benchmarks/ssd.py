#!/usr/bin/env python3
"""SSD chunked scan (Mamba2), forward + backward: ours (triton) vs mamba_ssm's Triton SSD vs
eager vs torch.compile(eager), all timed in the same run on the same inputs.

The peer is mamba_ssm's `mamba_chunk_scan_combined`, imported when it is importable (it is never
a dependency of the package: put its Triton SSD sources on PYTHONPATH for the run, as
benchmarks/NOTES.md describes); without it the script says so and times the rest. A comparison
with numbers from another day is not a comparison, so no peer timing is stored here.

Shapes are those at which mamba_ssm's SSD is usually quoted (bf16 x/B/C, float32 dt). Every call
is the Mamba2 layer's: D per head, dt_bias, softplus; gradients of x, dt, A, B, C, D and dt_bias
under fixed random output gradients (torch.autograd.grad, so nothing accumulates). Each timing
is the median of `--reps` CUDA-event-timed passes after `--warmup` untimed ones.

Also per shape: the forward alone (ours and the peer's), and how far the Triton results are from
the eager op's in float32 (max |triton - eager| / max |eager| over y and each gradient). The
summary table at the end gives ours / mamba_ssm per shape. `--bwd split chunk` times each
Triton backward variant (kernels/ssd/triton.py BWD_VARIANT) as its own rows, in the same run
(default: the variant MEGATRON_HYBRID_SSD_BWD selects, else split). `--sweep` times other
launch configurations (kernels/ssd/triton.py GPU_TUNING) at the three large shapes, `--profile`
lists the Triton kernels' times at the two 16384-token shapes (chunks of 128 and 256).
`--shape L16384` (repeatable: each a part of a shape's name) keeps the shapes whose name holds
it, for timing, sweep and profile alike, so one device call can spend its minutes on one shape.
torch.compile runs last (its compile time dominates), and results go to `--out` as JSON after
every measurement, so a run cut short keeps what it measured.

    python benchmarks/ssd.py --out ssd.json [--bwd split chunk] [--sweep] [--profile]
    python benchmarks/ssd.py --shape L16384 --profile --impls triton mamba_ssm
    TRITON_INTERPRET=1 python benchmarks/ssd.py --small --reps 1 --warmup 0   # CPU smoke run

benchmarks/kernels.py includes these rows through `results(device, args)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from profiling import kernel_breakdown  # benchmarks/profiling.py, beside this script
from timing import median_ms  # benchmarks/timing.py, beside this script

from megatron_hybrid.kernels.ssd import triton as triton_ssd
from megatron_hybrid.kernels.ssd.eager import ssd_chunked_scan as eager_ssd


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seqlen: int
    nheads: int
    chunk_size: int
    headdim: int = 64
    ngroups: int = 8
    dstate: int = 128

    @property
    def name(self) -> str:
        return (
            f"B{self.batch} L{self.seqlen} H{self.nheads} P{self.headdim} G{self.ngroups} "
            f"N{self.dstate} c{self.chunk_size}"
        )


SHAPES = [
    Shape(4, 1024, 32, 128),
    Shape(4, 4096, 64, 128),
    Shape(2, 8192, 64, 256),
    Shape(1, 16384, 128, 256),
]
SMALL_SHAPES = [Shape(1, 40, 4, 16, headdim=8, ngroups=2, dstate=8)]


def selected(shapes: list[Shape], parts: list[str] | None) -> list[Shape]:
    """The shapes whose name holds one of `parts` (all of them without any); ValueError naming
    the shapes there are when none matches."""
    if not parts:
        return shapes
    kept = [shape for shape in shapes if any(part in shape.name for part in parts)]
    if not kept:
        names = "; ".join(shape.name for shape in shapes)
        raise ValueError(f"--shape {' '.join(parts)} matches none of the shapes: {names}")
    return kept


IMPLS = ("triton", "mamba_ssm", "eager", "compile")


def mamba_ssm_scan() -> Callable | str:
    """mamba_ssm's `mamba_chunk_scan_combined` (same keyword arguments as ours), or why not."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as error:  # not on the path, or its own imports (einops) missing
        return f"{type(error).__name__}: {error}"
    return mamba_chunk_scan_combined


SWEEP = [  # GPU_TUNING overrides tried by --sweep
    {},
    {"chunk_state_warps": 4},
    {"bwd_stages": 1},
    {"bwd_stages": 2},
    {"bwd_stages": 4},
    {"chunk_scan_stages": 2},
    {"chunk_state_stages": 2},
    {"bwd_tile": 64, "bwd_stages": 1},
    {"chunk_dx_warps": 4},  # the chunk backward's kernels (--bwd chunk)
    {"chunk_db_warps": 8},
    {"chunk_dx_tile_k": 32},
    {"chunk_dx_tile_m": 128},
    {"chunk_dx_tile_m": 32, "chunk_dx_tile_k": 32, "chunk_dx_warps": 4},
]


def make_inputs(shape: Shape, device: torch.device) -> tuple[dict, torch.Tensor]:
    """The layer's arguments (bf16 x, B, C; float32 dt, A, D, dt_bias) and an output gradient."""
    generator = torch.Generator().manual_seed(0)

    def randn(*size, dtype=torch.float32, scale=1.0):
        return (scale * torch.randn(*size, generator=generator)).to(device=device, dtype=dtype)

    b, l, h, p, g, n = (
        shape.batch,
        shape.seqlen,
        shape.nheads,
        shape.headdim,
        shape.ngroups,
        shape.dstate,
    )
    inputs = dict(
        x=randn(b, l, h, p, dtype=torch.bfloat16),
        dt=randn(b, l, h),
        A=-torch.exp(randn(h)),
        B=randn(b, l, g, n, dtype=torch.bfloat16),
        C=randn(b, l, g, n, dtype=torch.bfloat16),
        D=randn(h),
        dt_bias=randn(h, scale=0.5) - 2.0,
    )
    return inputs, randn(b, l, h, p, dtype=torch.bfloat16)


def call(fn: Callable, inputs: dict, chunk_size: int) -> torch.Tensor:
    return fn(**inputs, chunk_size=chunk_size, dt_softplus=True)


def fwd_bwd_step(fn: Callable, inputs: dict, dy: torch.Tensor, chunk_size: int) -> Callable:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}

    def step():
        y = call(fn, leaves, chunk_size)
        torch.autograd.grad(y, list(leaves.values()), dy)

    return step


def fwd_step(fn: Callable, inputs: dict, chunk_size: int) -> Callable:
    def step():
        with torch.no_grad():
            call(fn, inputs, chunk_size)

    return step


def deviation(inputs: dict, dy: torch.Tensor, chunk_size: int) -> dict[str, float]:
    """max |triton - eager in float32| / max |eager| for y and each gradient."""
    results = []
    for fn, cast in ((triton_ssd.ssd_chunked_scan, False), (eager_ssd, True)):
        leaves = {
            k: (v.float() if cast else v).detach().requires_grad_() for k, v in inputs.items()
        }
        y = call(fn, leaves, chunk_size)
        grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
        results.append({"y": y, **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}})
        del leaves, y, grads
    got, want = results
    return {k: ((got[k].float() - want[k]).abs().max() / want[k].abs().max()).item() for k in got}


def kernel_profile(
    inputs: dict, dy: torch.Tensor, chunk_size: int, steps: int = 3
) -> list[tuple[str, float]]:
    """(kernel name, microseconds per fwd+bwd step) for the Triton implementation."""
    step = fwd_bwd_step(triton_ssd.ssd_chunked_scan, inputs, dy, chunk_size)
    step()
    return list(kernel_breakdown(step, steps, torch.device("cuda")).items())


def backward_variants(args: argparse.Namespace) -> list[str]:
    """The Triton backward variants to time (`--bwd`), else the one selected at import."""
    return list(getattr(args, "bwd", None) or [triton_ssd.BWD_VARIANT])


@contextlib.contextmanager
def triton_backward(variant: str) -> Iterator[None]:
    """Run the Triton SSD with backward `variant` inside the block."""
    selected = triton_ssd.BWD_VARIANT
    triton_ssd.BWD_VARIANT = variant
    try:
        yield
    finally:
        triton_ssd.BWD_VARIANT = selected


def _error(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def results(
    device: torch.device,
    args: argparse.Namespace,
    report: dict | None = None,
    save: Callable[[], None] = lambda: None,
) -> list[dict]:
    """One row per (shape, implementation, and for triton backward variant): fwd+bwd median ms
    (and the Triton forward alone and deviation from eager), or the error that stopped it. `args`
    needs warmup and reps; small, bwd, sweep, profile and impls are optional."""
    small = getattr(args, "small", False) or device.type != "cuda"
    chosen = getattr(args, "shape", None)  # --shape parts: None times (and profiles) the defaults
    shapes = SMALL_SHAPES if small else selected(SHAPES, chosen)
    impls = [i for i in getattr(args, "impls", None) or IMPLS if i in IMPLS]
    peer = mamba_ssm_scan() if "mamba_ssm" in impls else None
    if isinstance(peer, str):
        print(f"mamba_ssm is not importable ({peer}): its rows are missing, the rest still run")
        impls.remove("mamba_ssm")
    if device.type != "cuda" and "mamba_ssm" in impls:
        impls.remove("mamba_ssm")  # its kernels are CUDA-only
    rows: list[dict] = [] if report is None else report.setdefault("rows", [])
    warmup, reps = args.warmup, args.reps
    variants = backward_variants(args)

    def add(row: dict) -> None:
        rows.append(row)
        print(format_row(row), flush=True)
        save()

    def time_impl(row, impl, inputs, dy, chunk_size, compiled) -> None:
        fn = {
            "triton": triton_ssd.ssd_chunked_scan,
            "mamba_ssm": peer,
            "eager": eager_ssd,
            "compile": compiled,
        }[impl]
        try:
            row["median_ms"] = median_ms(
                fwd_bwd_step(fn, inputs, dy, chunk_size), warmup=warmup, repeat=reps, device=device
            )
            if impl in ("triton", "mamba_ssm"):
                row["fwd_median_ms"] = median_ms(
                    fwd_step(fn, inputs, chunk_size), warmup=warmup, repeat=reps, device=device
                )
            if impl == "triton":
                row["max_rel_deviation_from_eager"] = deviation(inputs, dy, chunk_size)
        except Exception as error:  # out of memory, compile failure
            row["error"] = _error(error)

    def time_shapes(phase: list[str]) -> None:
        compiled = torch.compile(eager_ssd, dynamic=False) if "compile" in phase else None
        for shape in shapes:
            inputs, dy = make_inputs(shape, device)
            for impl in phase:
                for variant in variants if impl == "triton" else [None]:
                    row = dict(op="ssd", shape=shape.name, impl=impl)
                    if variant is not None:
                        row["bwd"] = variant
                    with triton_backward(variant or triton_ssd.BWD_VARIANT):
                        time_impl(row, impl, inputs, dy, shape.chunk_size, compiled)
                    add(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del inputs, dy

    time_shapes([i for i in impls if i != "compile"])

    if getattr(args, "profile", False) and device.type == "cuda":
        profiles = {}
        # By default the two 16384-token shapes (chunks of 128 and of 256).
        profiled = shapes if chosen else [SHAPES[1], SHAPES[2]]
        for shape in profiled:
            inputs, dy = make_inputs(shape, device)
            for variant in variants:
                try:
                    with triton_backward(variant):
                        profile = kernel_profile(inputs, dy, shape.chunk_size)
                except Exception as error:
                    print(f"profile failed: {_error(error)}")
                    profile = []
                print(f"\nTriton kernels at {shape.name}, bwd {variant}, us per fwd+bwd:")
                for name, us in profile[:20]:
                    print(f"  {us:9.1f}  {name[:90]}")
                profiles[f"{shape.name} bwd={variant}"] = dict(profile)
            del inputs, dy
        if report is not None:
            report["profile"] = profiles
            save()

    if getattr(args, "sweep", False) and device.type == "cuda":
        default = dict(triton_ssd.GPU_TUNING)
        for shape in shapes if chosen else SHAPES[1:]:
            inputs, dy = make_inputs(shape, device)
            for override in SWEEP:
                for variant in variants:
                    row = dict(
                        op="ssd", shape=shape.name, impl="triton", bwd=variant, tuning=override
                    )
                    triton_ssd.GPU_TUNING.update(override)
                    try:
                        with triton_backward(variant):
                            time_impl(row, "triton", inputs, dy, shape.chunk_size, None)
                    finally:
                        triton_ssd.GPU_TUNING.clear()
                        triton_ssd.GPU_TUNING.update(default)
                    add(row)
            del inputs, dy

    # torch.compile last: its compile time dominates, so a run cut short has everything else.
    time_shapes([i for i in impls if i == "compile"])
    return rows


def format_row(row: dict) -> str:
    impl = row["impl"] + (f" bwd={row['bwd']}" if "bwd" in row else "")
    impl += f" {row['tuning']}" if "tuning" in row else ""
    lead = f"{row['shape']:<34} {impl:<28}"
    if "error" in row:
        return f"{lead} {row['error']}"
    fwd = f"{row['fwd_median_ms']:8.3f}" if "fwd_median_ms" in row else f"{'-':>8}"
    line = f"{lead} {row['median_ms']:9.3f} {fwd}"
    if "max_rel_deviation_from_eager" in row:
        worst = max(row["max_rel_deviation_from_eager"].items(), key=lambda kv: kv[1])
        line += f"   max dev {worst[1]:.1e} ({worst[0]})"
    return line


HEADER = f"{'shape':<34} {'impl':<28} {'fwd+bwd':>9} {'fwd':>8}   (median ms)"


def peer_ratios(rows: list[dict]) -> list[dict]:
    """Per shape (and Triton backward variant) timed by both in this run: ours / mamba_ssm,
    fwd+bwd and forward alone."""
    timed = [r for r in rows if "tuning" not in r and "median_ms" in r]
    peer = {r["shape"]: r for r in timed if r["impl"] == "mamba_ssm"}
    return [
        dict(
            shape=ours["shape"],
            bwd=ours.get("bwd"),
            ours_ms=ours["median_ms"],
            mamba_ssm_ms=peer[ours["shape"]]["median_ms"],
            ratio=ours["median_ms"] / peer[ours["shape"]]["median_ms"],
            ours_fwd_ms=ours["fwd_median_ms"],
            mamba_ssm_fwd_ms=peer[ours["shape"]]["fwd_median_ms"],
            fwd_ratio=ours["fwd_median_ms"] / peer[ours["shape"]]["fwd_median_ms"],
        )
        for ours in timed
        if ours["impl"] == "triton" and ours["shape"] in peer
    ]


def format_ratios(ratios: list[dict]) -> str:
    lines = [
        f"{'shape':<34} {'bwd':<6} {'ours':>8} {'mamba_ssm':>9} {'ratio':>6}   {'fwd ours':>8} "
        f"{'mamba_ssm':>9} {'ratio':>6}   (ms; ratio = ours / mamba_ssm, same run)"
    ]
    lines += [
        f"{r['shape']:<34} {r['bwd'] or '-':<6} {r['ours_ms']:8.3f} {r['mamba_ssm_ms']:9.3f} "
        f"{r['ratio']:6.2f}   {r['ours_fwd_ms']:8.3f} {r['mamba_ssm_fwd_ms']:9.3f} "
        f"{r['fwd_ratio']:6.2f}"
        for r in ratios
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="a tiny shape (CPU smoke run)")
    parser.add_argument(
        "--bwd",
        nargs="+",
        choices=sorted(triton_ssd._BWD_VARIANTS),
        help="Triton backward variants to time as separate rows (default: the selected one)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also time other launch configurations (GPU)"
    )
    parser.add_argument("--profile", action="store_true", help="per-kernel times (GPU)")
    parser.add_argument(
        "--shape",
        action="append",
        metavar="PART",
        help="keep the shapes whose name holds PART, e.g. L16384 (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    try:
        selected(SHAPES, args.shape)
    except ValueError as error:
        parser.error(str(error))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = dict(
        benchmark="ssd",
        device=(
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        torch=torch.__version__,
        triton=_triton_version(),
        warmup=args.warmup,
        reps=args.reps,
        tuning=dict(triton_ssd.GPU_TUNING),
        rows=[],
    )

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    print(HEADER)
    rows = results(device, args, report, save)
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    ratios = peer_ratios(rows)
    if ratios:
        report["ours_vs_mamba_ssm"] = ratios
        save()
        print("\n" + format_ratios(ratios))
    return 0


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
