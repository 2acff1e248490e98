"""Progress output: one line per logged iteration (with a progress bar, an ETA and the
throughput per GPU), the `metrics.jsonl` file (one JSON object per logged iteration or
evaluation) and any metric sinks (TensorBoard, W&B: training/metric_sinks.py)."""

from __future__ import annotations

import json
import os
import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_rate(value: float, space: str = "") -> str:
    """12.3k, 4.56M (with `space` " ": 12.3 k): a rate in three significant digits."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{space}{suffix}"
    return f"{value:.3g}{space}"


class ProgressReporter:
    def __init__(
        self,
        total_iters: int,
        log_dir: str | None,
        live: bool | None = None,
        stream=None,
        enabled: bool = True,
        sinks: list | None = None,
        bar: bool = True,
    ):
        self.total = total_iters
        self.bar = bar
        # Ranks other than 0 of a distributed run report nothing.
        self.stream = (stream or sys.stdout) if enabled else open(os.devnull, "w")
        log_dir = log_dir if enabled else None
        # On a terminal, messages first clear the line (a log line never is: each stays).
        self.live = self.stream.isatty() if live is None else live
        self.start = time.perf_counter()
        self.metrics_file = None
        self.sinks = list(sinks or []) if enabled else []
        self.first_iteration, self.first_time = 0, self.start
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.metrics_file = open(os.path.join(log_dir, "metrics.jsonl"), "a")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def begin(self, iteration: int) -> None:
        """Training starts after `iteration` (0, or a resumed one): the ETA counts only the
        iterations this process runs, from here."""
        self.first_iteration, self.first_time = iteration, time.perf_counter()

    def write_metrics(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        for sink in self.sinks:
            sink.write(record)

    def log_iteration(
        self,
        iteration: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_sec: float,
        extra: dict | None = None,
    ) -> None:
        """One line and one record. `extra` may hold `mtp_loss`, `tokens_per_sec_per_gpu`,
        `tflops_per_gpu`, `mfu`, `peak_memory_gib` (shown) and anything else (recorded)."""
        elapsed = self.elapsed()
        record = {
            "iteration": iteration,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "elapsed_s": round(elapsed, 3),
        }
        record.update(extra or {})
        self.write_metrics(record)
        done = iteration - self.first_iteration
        eta = (time.perf_counter() - self.first_time) / max(done, 1) * (self.total - iteration)
        width = 24
        filled = int(width * iteration / self.total)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] " if self.bar else "iteration "
        throughput = f"{format_rate(tokens_per_sec)} tok/s"
        if "tokens_per_sec_per_gpu" in record:
            throughput += f" ({format_rate(record['tokens_per_sec_per_gpu'])}/GPU"
            if "tflops_per_gpu" in record:
                throughput += f", {record['tflops_per_gpu']:.1f} TFLOP/s/GPU"
            if "mfu" in record:
                throughput += f", MFU {100 * record['mfu']:.1f}%"
            throughput += ")"
        elif "tflops_per_gpu" in record:  # one process off the GPU: the run's rate
            throughput += f" {format_rate(record['tflops_per_gpu'] * 1e12, ' ')}FLOP/s"
        mtp = f"mtp {record['mtp_loss']:.4f} " if "mtp_loss" in record else ""
        line = (
            f"{bar}{iteration}/{self.total} loss {loss:.4f} {mtp}lr {lr:.2e} "
            f"grad {grad_norm:.3f} {throughput} "
            f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}"
        )
        if "peak_memory_gib" in record:
            line += f" mem {record['peak_memory_gib']:.1f}GiB"
        self.message(line)

    def log_eval(self, iteration: int, val_loss: float) -> None:
        self.write_metrics(
            {"iteration": iteration, "val_loss": val_loss, "elapsed_s": round(self.elapsed(), 3)}
        )
        self.message(f"validation at iteration {iteration}: loss {val_loss:.4f}")

    def message(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
