#!/usr/bin/env python3
"""Where a training step's GPU time goes, per rank, from torch.profiler Chrome traces.

Reads one trace per rank (`rank-<R>.json.gz` or `.json`, as torch.profiler's export_chrome_trace
writes them; a directory stands for every `*.json` / `*.json.gz` in it) and prints per trace:

    window     first GPU event's start to the last one's end (and each ProfilerStep#N's duration
               when the trace has those spans)
    busy       the union of all GPU events (kernels, memcpy, memset) over all streams
    idle       window - busy: time with nothing at all running on the GPU
    categories summed durations per kernel category (benchmarks/profiling.py's; memcpy and
               memset on their own), so overlapping streams can sum past the window
    comm       summed durations of the NCCL kernels, and "exposed": the time NCCL runs while no
               compute kernel (any other kernel) runs on any stream

With several traces (e.g. the one-GPU run and each data-parallel rank) a side-by-side table
follows. Times are in ms; interval arithmetic is exact on the trace's nanosecond timestamps.

    python benchmarks/trace_summary.py out/torch_profile/
    python benchmarks/trace_summary.py one_gpu/rank-0.json.gz dp2/torch_profile --out summary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import decimal
import gzip
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from profiling import COMMUNICATION, kernel_category  # benchmarks/profiling.py, beside this

Interval = tuple[int, int]  # [start, end) in nanoseconds

# Chrome-trace "cat" of GPU activities -> category; kernels are categorized by name. Kineto
# spells them in lower case today ("kernel", "gpu_memcpy"), capitalized in older releases.
_KERNEL_CAT = "kernel"
_COPY_CATS = {
    "gpu_memcpy": "memcpy",
    "memcpy": "memcpy",
    "gpu_memset": "memset",
    "memset": "memset",
}
_PROFILER_STEP = re.compile(r"ProfilerStep#(\d+)$")
NO_KERNELS = "no GPU kernel events (a CPU-only trace?): nothing to say about GPU time"


# ---- interval arithmetic: pure functions on [start, end) integer intervals -------------------


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint intervals covering exactly the union of `intervals` (touching ones
    merge; empty ones vanish)."""
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total_length(merged: Sequence[Interval]) -> int:
    """Summed length of disjoint intervals."""
    return sum(end - start for start, end in merged)


def subtract_intervals(kept: Sequence[Interval], removed: Sequence[Interval]) -> list[Interval]:
    """The parts of `kept` outside `removed`; both sorted and disjoint (merge_intervals')."""
    result: list[Interval] = []
    j = 0
    for start, end in kept:
        while j < len(removed) and removed[j][1] <= start:
            j += 1
        k = j  # `removed` intervals ending after `start`; the next `kept` may reuse them
        cursor = start
        while k < len(removed) and removed[k][0] < end:
            if removed[k][0] > cursor:
                result.append((cursor, removed[k][0]))
            cursor = max(cursor, removed[k][1])
            k += 1
        if cursor < end:
            result.append((cursor, end))
    return result


# ---- reading traces ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuEvent:
    name: str
    category: str
    start_ns: int
    end_ns: int
    stream: str


def _nanoseconds(microseconds: decimal.Decimal | int) -> int:
    # Kineto writes microseconds with 3 decimals: parsed as Decimal they convert to whole
    # nanoseconds exactly, where float64 would round 16-digit timestamps.
    return int((decimal.Decimal(microseconds) * 1000).to_integral_value())


def load_trace(path: Path) -> dict:
    """The trace's JSON (gzip or plain, by content); ValueError naming the file if it is not a
    Chrome trace."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        trace = json.loads(raw, parse_float=decimal.Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error}); expected a torch.profiler trace") from None
    if isinstance(trace, list):  # the Chrome trace format also allows a bare event array
        trace = {"traceEvents": trace}
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError(
            f"{path}: no 'traceEvents' list; expected a Chrome trace as torch.profiler's "
            "export_chrome_trace writes it"
        )
    return trace


def _complete_events(trace: dict) -> Iterable[dict]:
    for event in trace["traceEvents"]:
        if isinstance(event, dict) and event.get("ph") == "X" and "dur" in event:
            yield event


def gpu_events(trace: dict) -> list[GpuEvent]:
    """Kernels (categorized by name), memcpys and memsets; GPU-side user annotations are spans
    over kernels counted on their own, so they are left out."""
    events = []
    for event in _complete_events(trace):
        cat = str(event.get("cat", "")).lower()
        if cat == _KERNEL_CAT:
            category = kernel_category(event["name"])
        elif cat in _COPY_CATS:
            category = _COPY_CATS[cat]
        else:
            continue
        start = _nanoseconds(event["ts"])
        stream = (event.get("args") or {}).get("stream", event.get("tid"))
        events.append(
            GpuEvent(
                event["name"], category, start, start + _nanoseconds(event["dur"]), str(stream)
            )
        )
    return events


def profiler_steps(trace: dict) -> dict[int, Interval]:
    """{N: span} of the host-side ProfilerStep#N annotations (the GPU-side copies of them,
    cat "gpu_user_annotation", cover only the kernels and are skipped)."""
    steps = {}
    for event in _complete_events(trace):
        match = _PROFILER_STEP.match(str(event.get("name", "")))
        if match and not str(event.get("cat", "")).lower().startswith("gpu_"):
            start = _nanoseconds(event["ts"])
            steps[int(match.group(1))] = (start, start + _nanoseconds(event["dur"]))
    return dict(sorted(steps.items()))


# ---- the summary -------------------------------------------------------------------------------


@dataclasses.dataclass
class TraceSummary:
    """One trace's figures in ms; the GPU figures are None when the trace has no GPU events."""

    label: str
    step_ms: dict[int, float]
    gpu_events: int
    window_ms: float | None = None
    busy_ms: float | None = None
    idle_ms: float | None = None
    category_ms: dict[str, float] | None = None
    comm_ms: float | None = None
    exposed_comm_ms: float | None = None


def _ms(nanoseconds: int) -> float:
    return nanoseconds / 1e6


def summarize(label: str, events: Sequence[GpuEvent], steps: dict[int, Interval]) -> TraceSummary:
    """The figures of the module docstring for one trace's GPU events and ProfilerStep spans."""
    summary = TraceSummary(
        label, {n: _ms(end - start) for n, (start, end) in steps.items()}, len(events)
    )
    if not events:
        return summary
    window = max(e.end_ns for e in events) - min(e.start_ns for e in events)
    busy = total_length(merge_intervals((e.start_ns, e.end_ns) for e in events))
    per_category: dict[str, int] = {}
    for e in events:
        per_category[e.category] = per_category.get(e.category, 0) + e.end_ns - e.start_ns
    comm = merge_intervals((e.start_ns, e.end_ns) for e in events if e.category == COMMUNICATION)
    compute = merge_intervals(
        (e.start_ns, e.end_ns)
        for e in events
        if e.category not in {COMMUNICATION, *_COPY_CATS.values()}
    )
    summary.window_ms = _ms(window)
    summary.busy_ms = _ms(busy)
    summary.idle_ms = _ms(window - busy)
    summary.category_ms = {
        category: _ms(ns) for category, ns in sorted(per_category.items(), key=lambda kv: -kv[1])
    }
    summary.comm_ms = _ms(per_category.get(COMMUNICATION, 0))
    summary.exposed_comm_ms = _ms(total_length(subtract_intervals(comm, compute)))
    return summary


def summarize_file(path: Path, label: str) -> TraceSummary:
    trace = load_trace(path)
    return summarize(label, gpu_events(trace), profiler_steps(trace))


# ---- input paths and labels --------------------------------------------------------------------


def trace_files(paths: Sequence[str]) -> list[Path]:
    """The trace files named, a directory standing for its *.json and *.json.gz files (in
    rank order); ValueError for a path that is missing or a directory without traces."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = [p for p in path.iterdir() if p.name.endswith((".json", ".json.gz"))]
            if not found:
                raise ValueError(f"{path}: no *.json or *.json.gz trace files in this directory")
            files.extend(sorted(found, key=_rank_order))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory; expected a trace or a folder")
    return files


def _rank_order(path: Path) -> tuple:
    match = re.search(r"rank-(\d+)", path.name)
    return (int(match.group(1)) if match else -1, path.name)


def labels(files: Sequence[Path]) -> list[str]:
    """The file names without .json/.json.gz, each prefixed by its folder when names repeat
    (e.g. `one_gpu/rank-0`, `dp2/rank-0`, `dp2/rank-1`)."""
    stems = [re.sub(r"\.json(\.gz)?$", "", f.name) for f in files]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{f.parent.name}/{stem}" for f, stem in zip(files, stems, strict=True)]


# ---- output ------------------------------------------------------------------------------------


def _steps_line(summary: TraceSummary) -> str:
    if not summary.step_ms:
        return "  no ProfilerStep#N spans"
    durations = ", ".join(f"#{n} {ms:.3f}" for n, ms in summary.step_ms.items())
    return f"  ProfilerStep durations (ms): {durations}"


def _rows(summary: TraceSummary) -> list[tuple[str, float]]:
    """(metric, ms) rows of the per-trace and side-by-side tables: wall-time figures, then the
    summed kernel time per category (indented)."""
    rows = [
        ("window", summary.window_ms),
        ("busy", summary.busy_ms),
        ("idle", summary.idle_ms),
        ("exposed communication", summary.exposed_comm_ms),
    ]
    return rows + [(f"  {c}", ms) for c, ms in summary.category_ms.items()]


def format_trace(summary: TraceSummary) -> str:
    lines = [f"{summary.label}:", _steps_line(summary)]
    if not summary.gpu_events:
        return "\n".join([*lines, f"  {NO_KERNELS}"])
    steps = len(summary.step_ms)
    header = f"  {'(categories: summed kernel time)':<32} {'ms':>10} {'% window':>9}"
    lines.append(header + (f" {'ms/step':>9}" if steps else ""))
    for metric, ms in _rows(summary):
        per_step = f" {ms / steps:9.3f}" if steps else ""
        lines.append(f"  {metric:<32} {ms:10.3f} {100 * ms / summary.window_ms:8.1f}%{per_step}")
    return "\n".join(lines)


def format_comparison(summaries: Sequence[TraceSummary]) -> str:
    """Metrics down, traces across: ms per ProfilerStep where every trace has those spans (the
    traces may hold different step counts), else ms of the whole trace."""
    measured = [s for s in summaries if s.gpu_events]
    per_step = all(s.step_ms for s in measured)
    width = max(12, *(len(s.label) for s in measured))
    unit = "ms per step" if per_step else "ms (whole trace)"
    lines = [f"{unit:<32}" + "".join(f" {s.label:>{width}}" for s in measured)]
    if per_step:
        means = (sum(s.step_ms.values()) / len(s.step_ms) for s in measured)
        lines.append(f"{'ProfilerStep (host)':<32}" + "".join(f" {ms:{width}.3f}" for ms in means))
    metrics = list(dict.fromkeys(metric for s in measured for metric, _ in _rows(s)))
    for metric in metrics:
        cells = []
        for s in measured:
            ms = dict(_rows(s)).get(metric)
            divisor = len(s.step_ms) if per_step else 1
            cells.append(f" {'-':>{width}}" if ms is None else f" {ms / divisor:{width}.3f}")
        lines.append(f"{metric:<32}" + "".join(cells))
    return "\n".join(lines)


def as_json(summary: TraceSummary) -> dict:
    fields = dataclasses.asdict(summary)
    return fields if summary.gpu_events else {**fields, "note": NO_KERNELS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", help="trace files or folders of them")
    parser.add_argument("--out", type=Path, help="also write the summaries as JSON here")
    args = parser.parse_args(argv)
    try:
        files = trace_files(args.traces)
        summaries = [
            summarize_file(f, label) for f, label in zip(files, labels(files), strict=True)
        ]
    except ValueError as error:
        parser.error(str(error))
    print("\n\n".join(format_trace(s) for s in summaries))
    if sum(1 for s in summaries if s.gpu_events) > 1:
        print("\n" + format_comparison(summaries))
    if args.out:
        args.out.write_text(json.dumps([as_json(s) for s in summaries], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
