"""Typed settings of a training run: one dataclass per flag group, a docstring per field.

Each field's default is the default of its flag (training/arguments.py builds the parser from
these dataclasses and maps parsed flags back onto them, in `settings_from_args`). Groups that a
lower package reads live beside it: DataSettings (data/builder.py), TokenizerSettings
(data/tokenizer.py), KernelSettings (kernels/cli.py), ParallelSettings
(parallel/parallelize.py), ProfilingSettings (training/profiling.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_hybrid.config import ModelConfig, pad_vocab_size
from megatron_hybrid.data.builder import DataSettings
from megatron_hybrid.data.tokenizer import TokenizerSettings
from megatron_hybrid.kernels.cli import KernelSettings
from megatron_hybrid.parallel.parallelize import ParallelSettings
from megatron_hybrid.training.optimizer import LRSchedule
from megatron_hybrid.training.profiling import ProfilingSettings

# The model a run with no flags trains: the embedded default run (the default pattern on the
# embedded corpus, a few minutes on 2 CPU cores). ModelConfig's defaults follow Megatron-LM and
# Nemotron-H, sized for billions of parameters; where this small model needs other values (or
# ModelConfig has no default), they are set here, and only here.
DEFAULT_MODEL_OVERRIDES: dict[str, Any] = {
    # All four implemented mixers, two of them in fusion groups (no ModelConfig default).
    "hybrid_layer_pattern": "[M-]M[*E]M[M-]",
    "hidden_size": 128,  # no ModelConfig default; small enough for CPU training
    # 4 query heads of 32 channels in 2 key/value groups: GQA at hidden size 128.
    "num_attention_heads": 4,
    "num_query_groups": 2,
    # Mamba2 heads of 32 channels (64: only 4 heads at hidden 128 and expand 2) in 2 groups.
    "mamba_head_dim": 32,
    "mamba_num_groups": 2,
    # State 32, not Nemotron-H's 128: the state's share of compute and memory stays in
    # proportion to the 128-wide model.
    "mamba_state_dim": 32,
    # Chunks of 64, not 128: the 256-token samples become 4 chunks, so the run exercises the
    # state passed between chunks, and the quadratic within-chunk work is smaller on CPU.
    "mamba_chunk_size": 64,
    "num_moe_experts": 4,  # the pattern's MoE layer (no ModelConfig default)
    # Switch load-balancing loss on (ModelConfig's 0 is Megatron's "off"): it is what keeps the
    # default MoE layer's 4 experts in use, as the expert bias is off by default.
    "moe_aux_loss_coeff": 1e-2,
}


# The small model's values apply as a whole, and only while --hidden-size is not given: a
# command line that sizes its own model (as every Megatron-LM one does) gets ModelConfig's
# defaults, which are Megatron-Core's, for every flag it leaves out. A Megatron user's
# `--hidden-size 1024 --mamba-num-heads 32 ...` then builds Megatron's model (state 128, chunks
# of 128), not the small model's. The pattern has no Megatron default: its default applies to
# both.
EMBEDDED_ONLY = frozenset(DEFAULT_MODEL_OVERRIDES) - {"hybrid_layer_pattern"}


def model_config_default(name: str) -> Any:
    """ModelConfig's default for field `name` (Megatron-Core's), None where it has none."""
    default = {f.name: f.default for f in dataclasses.fields(ModelConfig)}[name]
    return None if default is dataclasses.MISSING else default


def default_model_value(name: str, embedded: bool = True) -> Any:
    """The model flags' default for ModelConfig field `name`: the embedded model's
    (DEFAULT_MODEL_OVERRIDES) while `embedded` (no --hidden-size given), else ModelConfig's."""
    if name in DEFAULT_MODEL_OVERRIDES and (embedded or name not in EMBEDDED_ONLY):
        return DEFAULT_MODEL_OVERRIDES[name]
    return model_config_default(name)


def resolve_model_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` (the model flags by ModelConfig field, None where a flag was left out) with the
    embedded-only fields left out filled in: the embedded model's values when no hidden size was
    given, else ModelConfig's (module comment above EMBEDDED_ONLY)."""
    embedded = fields.get("hidden_size") is None
    resolved = dict(fields)
    for name in EMBEDDED_ONLY:
        if resolved.get(name) is None:
            resolved[name] = default_model_value(name, embedded)
    return resolved


@dataclass
class ModelSettings:
    """The model flags: the ModelConfig they describe, all but the vocabulary (the tokenizer's)."""

    config_fields: dict[str, Any] = field(default_factory=dict)
    """ModelConfig keyword arguments, every field except `vocab_size`; None for an
    EMBEDDED_ONLY field no flag set, which `resolved_fields` fills in once the hidden size is
    known (a checkpoint's, with --use-checkpoint-args)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding's rows: the tokenizer's vocabulary padded up to a multiple of this."""

    def resolved_fields(self) -> dict[str, Any]:
        """`config_fields` with the unset EMBEDDED_ONLY fields filled in (resolve_model_fields)."""
        return resolve_model_fields(self.config_fields)

    def config(self, vocab_size: int) -> ModelConfig:
        """The ModelConfig for a tokenizer of `vocab_size` ids (ConfigError if unfit)."""
        return ModelConfig(
            **self.resolved_fields(),
            vocab_size=pad_vocab_size(vocab_size, self.make_vocab_size_divisible_by),
        )


@dataclass
class TrainingSettings:
    """What one optimizer step reads and how it updates: batch, schedule, AdamW, precision."""

    seq_length: int = 256
    """Tokens per sample (the model sees seq_length inputs and as many next-token labels)."""
    micro_batch_size: int = 16
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; None: micro batch size x data-parallel size.
    A multiple of that; the rest is gradient accumulation."""
    train_iters: int = 250
    """Optimizer steps of the whole run (the learning-rate schedule follows it)."""
    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-4
    """Learning rate after the decay."""
    lr_warmup_iters: int = 30
    """Iterations of linear warmup from 0 to `lr`."""
    lr_decay_iters: int | None = None
    """Iterations (warmup included) after which the rate stays at `min_lr`; None:
    `train_iters`."""
    lr_decay_style: str = "cosine"
    """constant, linear, cosine or inverse-square-root."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on matrices only."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 turns clipping off."""
    bf16: bool = False
    """bf16 autocast (CUDA only); with FSDP, bf16 parameters and float32 gradient reduction."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop, before the optimizer step and any save, at the first iteration whose loss or
    gradient norm is not finite."""
    skip_nonfinite_iterations: int = 0
    """With the check on: skip the update of up to this many such iterations, then stop."""
    exit_interval: int | None = None
    """Stop (after saving) at the first iteration divisible by this; the schedule still follows
    `train_iters`, so a resumed run continues it."""
    exit_signal_handler: bool = True
    """On `exit_signal` or SIGINT (Ctrl-C), save at the next iteration boundary and exit with
    status 0 (Megatron-LM's flag, on by default here: schedulers send SIGTERM before they
    kill)."""
    exit_signal: str = "SIGTERM"
    """The scheduler's signal that asks the run to stop: SIGTERM, SIGUSR1, SIGUSR2 or SIGHUP."""
    seed: int = 1234
    """Seeds the initial weights, the data order and the sample generation."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""

    def lr_schedule(self) -> LRSchedule:
        """The learning-rate schedule of these settings (the decay ends at `train_iters` unless
        `lr_decay_iters` says otherwise)."""
        decay_iters = self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters
        return LRSchedule(
            self.lr, self.min_lr, self.lr_warmup_iters, decay_iters, self.lr_decay_style
        )


@dataclass
class CheckpointSettings:
    """Where checkpoints go and what a load restores (the "checkpointing" flags)."""

    save: str | None = None
    """Directory to save checkpoints to; None: no saves."""
    save_interval: int | None = None
    """Save every this many iterations (and always at the end of training and at an exit)."""
    load: str | None = None
    """Directory (or iter_* directory) to resume from; one without checkpoints starts from
    scratch, so `load` and `save` may be the same."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""
    keep_last: int | None = None
    """Keep only the newest this many complete checkpoints."""
    ckpt_step: int | None = None
    """Load this iteration instead of the latest."""
    finetune: bool = False
    """Load model weights only; start at iteration 0 with a fresh optimizer."""
    no_load_optim: bool = False
    """Do not load the optimizer state."""
    no_load_rng: bool = False
    """Do not restore the random-number generators' states."""
    no_verify_checksums: bool = False
    """Skip the CRC32 check of checkpoint files on load (sizes are still checked)."""
    use_checkpoint_args: bool = False
    """Build the model the `load` checkpoint records, whatever the model flags say."""


@dataclass
class LoggingSettings:
    """What the run reports and evaluates, and how often (the "logging and evaluation"
    flags)."""

    log_interval: int = 10
    """Iterations per log line and metrics.jsonl record (one host sync each)."""
    eval_interval: int = 100
    """Evaluate on the validation split every this many iterations (and at the end)."""
    eval_iters: int = 10
    """Global batches per evaluation (fewer if the split is smaller); 0: no evaluation."""
    log_dir: str | None = None
    """Directory receiving metrics.jsonl; None: none written."""
    generate_tokens: int = 200
    """Length of the sample generated after training; 0: none."""
    no_progress_bar: bool = False
    """Log lines without the progress bar."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars (Megatron-LM's names) here; needs the `tensorboard` extra."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project; needs the `wandb` extra."""
    wandb_exp_name: str | None = None
    """The W&B run's name (default: W&B picks one)."""
    wandb_save_dir: str | None = None
    """Where W&B keeps its local files (default: W&B's)."""


@dataclass
class Settings:
    """Everything a training run is told, by flag group."""

    model: ModelSettings
    """The architecture (the "model" flags)."""
    training: TrainingSettings = field(default_factory=TrainingSettings)
    """Batch, schedule, optimizer, precision."""
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    """Parallel layout and block wrappers."""
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    """Saves and loads."""
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    """Logs, evaluation, the generated sample."""
    data: DataSettings = field(default_factory=DataSettings)
    """Training, validation and test data."""
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    """The tokenizer of the data and of the sample."""
    kernels: KernelSettings = field(default_factory=KernelSettings)
    """The implementation of each op."""
    profiling: ProfilingSettings = field(default_factory=ProfilingSettings)
    """Which iterations to profile, on which ranks, and how."""
