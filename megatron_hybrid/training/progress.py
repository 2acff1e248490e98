"""Progress output: a live one-line bar on a terminal, plain log lines elsewhere, and the
`metrics.jsonl` file (one JSON object per logged iteration or evaluation)."""

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


class ProgressReporter:
    def __init__(
        self,
        total_iters: int,
        log_dir: str | None,
        live: bool | None = None,
        stream=None,
        enabled: bool = True,
    ):
        self.total = total_iters
        # Ranks other than 0 of a distributed run report nothing.
        self.stream = (stream or sys.stdout) if enabled else open(os.devnull, "w")
        log_dir = log_dir if enabled else None
        self.live = self.stream.isatty() if live is None else live
        self.start = time.perf_counter()
        self.metrics_file = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.metrics_file = open(os.path.join(log_dir, "metrics.jsonl"), "a")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write_metrics(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def log_iteration(
        self,
        iteration: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_sec: float,
        extra: dict | None = None,
    ) -> None:
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
        eta = elapsed / iteration * (self.total - iteration)
        width = 24
        filled = int(width * iteration / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{bar}] {iteration}/{self.total} loss {loss:.4f} lr {lr:.2e} "
            f"grad {grad_norm:.3f} {tokens_per_sec / 1000:.1f}k tok/s "
            f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}"
        )
        if "peak_memory_gib" in record:
            line += f" mem {record['peak_memory_gib']:.1f}GiB"
        if self.live:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

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
