"""Where the run's metrics go besides the console and metrics.jsonl: TensorBoard
(`--tensorboard-dir`) and Weights & Biases (`--wandb-project`), each an optional extra that is
imported only when its flag asks for it, under Megatron-LM's scalar names, so curves of runs
here and there overlay."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable

# metrics.jsonl key -> the scalar's name (Megatron-LM's where it logs the same quantity).
SCALAR_NAMES = {
    "loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "tflops_per_gpu": "throughput",  # Megatron's "throughput" is TFLOP/s per GPU
    "tokens_per_sec": "tokens-per-sec",
    "tokens_per_sec_per_gpu": "tokens-per-sec-per-gpu",
    "mfu": "mfu",
    "peak_memory_gib": "mem-max-allocated-gib",
    "moe_aux_loss": "load_balancing_loss",
    "mtp_loss": "mtp loss",  # the mean over depths; each depth k as Megatron's "mtp_{k} loss"
    "skipped_iterations": "skipped-iterations",
    "val_loss": "lm loss validation",
    "val_ppl": "lm loss validation ppl",
    "test_loss": "lm loss test",
}


class MissingExtraError(ValueError):
    """A flag needs an optional package that is not installed."""


# flag -> (the settings field that turns it on, the module it imports, the extra installing it)
EXTRAS = {
    "--tensorboard-dir": ("tensorboard_dir", "tensorboard", "tensorboard"),
    "--wandb-project": ("wandb_project", "wandb", "wandb"),
}


def check_extras(logging) -> None:
    """Raise MissingExtraError, on every rank and before any work, when a logging flag needs a
    package that is not installed."""
    for flag, (field, module, extra) in EXTRAS.items():
        if getattr(logging, field) and importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f"{flag} needs the `{module}` package, which is not installed: "
                f"pip install 'megatron-hybrid[{extra}]' (or drop {flag})"
            )


def scalars(record: dict) -> dict[str, float]:
    """The record's named scalars (validation perplexity derived from its loss)."""
    values = {SCALAR_NAMES[k]: float(v) for k, v in record.items() if k in SCALAR_NAMES}
    depths = [k for k in record if re.fullmatch(r"mtp_\d+_loss", k)]
    values.update({k.removesuffix("_loss") + " loss": float(record[k]) for k in depths})
    if "val_loss" in record and record["val_loss"] < 700:  # exp overflows float64 beyond
        values[SCALAR_NAMES["val_ppl"]] = math.exp(record["val_loss"])
    return values


class TensorBoardSink:
    """Scalars against the iteration, and the training loss also against consumed samples
    (Megatron's "vs samples" curves: runs of different batch sizes compare)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # needs `tensorboard` (check_extras)

        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, record: dict) -> None:
        iteration = record["iteration"]
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, iteration)
            if "consumed_samples" in record and name in ("lm loss", "learning-rate"):
                self.writer.add_scalar(f"{name} vs samples", value, record["consumed_samples"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, name: str | None, save_dir: str | None, config: dict):
        import wandb  # an optional extra (check_extras)

        self.run = wandb.init(project=project, name=name, dir=save_dir, config=config)

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["iteration"])

    def close(self) -> None:
        self.run.finish()


def build_sinks(logging, config_for_wandb: Callable[[], dict]) -> list:
    """The sinks the logging settings ask for (call on the rank that reports)."""
    sinks: list = []
    if logging.tensorboard_dir:
        sinks.append(TensorBoardSink(logging.tensorboard_dir))
    if logging.wandb_project:
        sinks.append(
            WandbSink(
                logging.wandb_project,
                logging.wandb_exp_name,
                logging.wandb_save_dir,
                config_for_wandb(),
            )
        )
    return sinks
