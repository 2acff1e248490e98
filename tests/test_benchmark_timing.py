"""benchmarks/timing.py is the benchmarks' one timer: it times what it is given, and no benchmark
keeps a clock of its own."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import timing
finally:
    sys.path.pop(0)


def test_call_times_ms_runs_warmup_untimed_then_times_each_call():
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.02)

    times = timing.call_times_ms(fn, warmup=2, repeat=3, device="cpu")
    assert len(calls) == 5 and len(times) == 3
    # time.sleep sleeps at least as long as asked; only the lower bound is safe on a busy machine.
    assert all(t >= 20.0 for t in times), times


def test_median_ms_is_robust_to_one_slow_call():
    sleeps = iter([0.0, 0.3, 0.001, 0.001])  # one warmup call, then one slow timed call

    def fn():
        time.sleep(next(sleeps))

    median = timing.median_ms(fn, warmup=1, repeat=3, device=torch.device("cpu"))
    # The median is one of the 1 ms calls: at least 1 ms, far below the slow call's 300 ms.
    assert 1.0 <= median < 300.0


@pytest.mark.parametrize("warmup, repeat", [(0, 0), (-1, 3)])
def test_call_times_ms_rejects_impossible_counts(warmup, repeat):
    with pytest.raises(ValueError, match=f"repeat={repeat}, warmup={warmup}"):
        timing.call_times_ms(lambda: None, warmup=warmup, repeat=repeat, device="cpu")


def test_stopwatch_measures_wall_seconds():
    stopwatch = timing.Stopwatch()
    time.sleep(0.02)
    assert stopwatch.elapsed_s() >= 0.02


def test_no_benchmark_keeps_a_clock_of_its_own():
    clocks = re.compile(r"perf_counter|time\.time\(|time\.monotonic|cuda\.Event|do_bench")
    own = {
        path.name: sorted(set(clocks.findall(path.read_text())))
        for path in (REPO / "benchmarks").glob("*.py")
        if path.name != "timing.py"
    }
    assert {name: found for name, found in own.items() if found} == {}
