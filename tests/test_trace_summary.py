"""benchmarks/trace_summary.py: busy, idle, per-category and exposed communication time of
torch.profiler Chrome traces, computed exactly from synthetic traces whose answers are known,
and a plain statement (not zeros) for a trace without GPU kernels."""

from __future__ import annotations

import gzip
import json
import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import trace_summary as ts
finally:
    sys.path.pop(0)

# Timestamps are microseconds with 3 decimals, as Kineto writes them. This base (a Unix-epoch
# time, as some Kineto releases write) has 19 digits: float64 would miss it by up to 0.125 us, so
# the exact figures below also check that timestamps are read as exact nanoseconds.
BASE_US = Decimal("1733472000123456.789")


def _event(name, cat, start_us, dur_us, stream):
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "pid": 0,
        "tid": stream,
        "ts": BASE_US + Decimal(str(start_us)),
        "dur": dur_us,
        "args": {"device": 0, "stream": stream},
    }


def _synthetic_trace() -> dict:
    """Compute on stream 7, NCCL on stream 20, in microseconds from BASE_US:

    stream 7   gemm [0, 100)       inductor [150, 250)       memcpy [300, 310)
    stream 20       AllGather [50, 200)  ReduceScatter [180, 260)

    busy = [0, 260) + [300, 310) = 270, window = 310, idle = 40 (the gap [260, 300));
    communication kernels run 150 + 80 = 230; no compute runs during [100, 150) and
    [250, 260): 60 exposed. The memcpy is not compute, so it hides nothing.
    """
    return {
        "traceEvents": [
            _event("nvjet_tst_128x256_h_bz_coopA_NTT", "kernel", 0, 100, 7),
            _event("triton_poi_fused_add_mul_0", "kernel", 150, 100, 7),
            _event("Memcpy DtoD (Device -> Device)", "gpu_memcpy", 300, 10, 7),
            _event("ncclDevKernel_AllGather_RING_LL", "kernel", 50, 150, 20),
            _event("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", "kernel", 180, 80, 20),
            # Host-side step spans; the GPU-side copy of a span covers kernels already counted
            # and must not widen the window or the busy time.
            _event("ProfilerStep#4", "user_annotation", -20, 120, 1),
            _event("ProfilerStep#5", "user_annotation", 100, 230.5, 1),
            _event("ProfilerStep#4", "gpu_user_annotation", -500, 2000, 7),
            {"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "GPU 0"}},
        ]
    }


def _write(path: Path, trace: dict) -> Path:
    # json writes no Decimal: write it as a string, then unquote it into a JSON number.
    text = json.dumps(trace, default=str)
    data = re.sub(r'"ts": "(-?[0-9.]+)"', r'"ts": \1', text).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_merge_intervals_unions_overlapping_touching_and_nested_intervals():
    assert ts.merge_intervals([(5, 7), (0, 2), (1, 3), (3, 4), (10, 20), (12, 13), (8, 8)]) == [
        (0, 4),
        (5, 7),
        (10, 20),
    ]


def test_subtract_intervals_keeps_exactly_the_uncovered_parts():
    kept = [(0, 10), (20, 30), (40, 50)]
    removed = [(2, 4), (6, 22), (25, 26), (29, 45)]
    assert ts.subtract_intervals(kept, removed) == [(0, 2), (4, 6), (22, 25), (26, 29), (45, 50)]
    assert ts.subtract_intervals(kept, []) == kept
    assert ts.subtract_intervals(kept, [(-5, 100)]) == []


def test_synthetic_trace_gives_exact_busy_idle_categories_and_exposed_communication(tmp_path):
    summary = ts.summarize_file(_write(tmp_path / "rank-0.json", _synthetic_trace()), "rank-0")
    # Integer nanoseconds divided once by 1e6: each figure is the float nearest its exact value.
    assert summary.gpu_events == 5
    assert summary.window_ms == 0.310
    assert summary.busy_ms == 0.270
    assert summary.idle_ms == 0.040
    assert summary.comm_ms == 0.230
    assert summary.exposed_comm_ms == 0.060
    assert summary.category_ms == {
        "communication": 0.230,
        "gemm": 0.100,
        "inductor (fused elementwise)": 0.100,
        "memcpy": 0.010,
    }
    assert summary.step_ms == {4: 0.120, 5: 0.2305}


def test_communication_overlapping_itself_is_exposed_once(tmp_path):
    trace = {
        "traceEvents": [
            _event("ncclDevKernel_AllGather", "kernel", 0, 100, 20),
            _event("ncclDevKernel_ReduceScatter", "kernel", 40, 100, 21),
            _event("chunk_scan_fwd_kernel", "kernel", 120, 10, 7),
            # A memset is not compute: it hides no communication.
            _event("Memset (Device)", "gpu_memset", 10, 10, 7),
        ]
    }
    summary = ts.summarize_file(_write(tmp_path / "t.json", trace), "t")
    assert summary.comm_ms == 0.200  # summed durations
    # [0, 140) minus the compute kernel's [120, 130)
    assert summary.exposed_comm_ms == 0.130
    assert summary.busy_ms == summary.window_ms == 0.140 and summary.idle_ms == 0.0


def test_folder_of_plain_and_gzip_ranks_prints_each_rank_and_a_comparison(tmp_path, capsys):
    folder = tmp_path / "torch_profile"
    folder.mkdir()
    _write(folder / "rank-1.json.gz", _synthetic_trace())
    _write(folder / "rank-0.json", _synthetic_trace())
    out = tmp_path / "summary.json"
    assert ts.main([str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("rank-0:") < printed.index("rank-1:")
    comparison = printed.split("\n\n")[-1]
    assert comparison.splitlines()[0].split()[-2:] == ["rank-0", "rank-1"]
    # Two ProfilerStep spans per rank: the side-by-side figures are per step.
    assert "exposed communication" in comparison and "0.030" in comparison
    written = json.loads(out.read_text())
    assert [s["label"] for s in written] == ["rank-0", "rank-1"]
    assert written[0] == written[1] | {"label": "rank-0"}
    assert written[1]["exposed_comm_ms"] == 0.060


def test_same_rank_names_in_different_folders_are_told_apart(tmp_path):
    files = [tmp_path / "one_gpu" / "rank-0.json", tmp_path / "dp2" / "rank-0.json.gz"]
    files.append(tmp_path / "dp2" / "rank-1.json")
    assert ts.labels(files) == ["one_gpu/rank-0", "dp2/rank-0", "dp2/rank-1"]
    assert ts.labels(files[1:]) == ["rank-0", "rank-1"]


def test_cpu_trace_says_there_are_no_gpu_kernels_instead_of_zeros(tmp_path, capsys):
    x = torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            x = torch.tanh(x @ x)
    path = tmp_path / "rank-0.json.gz"
    prof.export_chrome_trace(str(path))
    out = tmp_path / "summary.json"
    assert ts.main([str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ts.NO_KERNELS in printed
    assert "busy" not in printed and "idle" not in printed
    (written,) = json.loads(out.read_text())
    assert written["gpu_events"] == 0 and written["busy_ms"] is None
    assert written["note"] == ts.NO_KERNELS


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.json", "no such file or directory"),
        (lambda d: d, "no \\*.json or \\*.json.gz trace files"),
        (lambda d: _write(d / "x.json", {"events": []}), "no 'traceEvents' list"),
    ],
)
def test_bad_inputs_name_the_path_and_what_was_expected(tmp_path, capsys, make, message):
    path = make(tmp_path)
    with pytest.raises(SystemExit):
        ts.main([str(path)])
    err = capsys.readouterr().err
    assert str(path) in err
    assert re.search(message, err), err
