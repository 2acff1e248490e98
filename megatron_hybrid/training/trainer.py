"""Training on one process or every rank of a torchrun launch (data parallel with FSDP2 or DDP,
tensor parallel with DTensor, pipeline parallel with torch.distributed.pipelining). Read top to
bottom:

    run_training     flags -> settings -> build -> resume -> train -> test split, sample
    Trainer          a rank's model parts, parallelized, their optimizer and pipeline:
                     `train_step` (one optimizer step) and `evaluate`
    train            the loop: read the batch, step, log, save, evaluate

A rank trains its model *parts*: the whole model, or with pipeline parallelism the stages it
holds. Each part is parallelized as a whole model would be (parallel/parallelize.py). Which
global samples a rank reads is data/sharding.py's rule.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from megatron_hybrid.checkpointing.errors import CheckpointNotFoundError
from megatron_hybrid.checkpointing.manager import (
    CheckpointSaver,
    load_checkpoint,
    tokenizer_attachment,
)
from megatron_hybrid.checkpointing.parts import OptimizerParts, as_optimizers
from megatron_hybrid.checkpointing.state import TrainProgress
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.data.builder import DataSettings, build_datasets
from megatron_hybrid.data.embedded import embedded_token_streams
from megatron_hybrid.data.sampler import StreamSampler
from megatron_hybrid.data.sharding import DataParallelShare
from megatron_hybrid.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer
from megatron_hybrid.flops import parameter_count, peak_bf16_tflops, training_flops_per_token
from megatron_hybrid.generation import Sampling, generate
from megatron_hybrid.kernels.cli import kernels_from_settings
from megatron_hybrid.kernels.registry import BoundKernels
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.data_parallel import prepare_micro_batch
from megatron_hybrid.parallel.dims import ParallelDims
from megatron_hybrid.parallel.distributed import (
    all_reduce_mean,
    all_reduce_sum_,
    init_distributed,
)
from megatron_hybrid.parallel.fp8 import bind_fp8
from megatron_hybrid.parallel.grad_norm import clip_divisor, clip_grad_norm, gradient_norm
from megatron_hybrid.parallel.parallelize import ParallelSettings, parallelize
from megatron_hybrid.parallel.pipeline import (
    Pipeline,
    TiedEmbeddingSync,
    default_schedule,
    rank_stage_specs,
    stage_blocks,
)
from megatron_hybrid.parallel.whole_model import whole_model
from megatron_hybrid.training.arguments import (
    check_training_args,
    resolve_global_batch_size,
    settings_from_args,
)
from megatron_hybrid.training.checkpoint_args import with_checkpoint_model
from megatron_hybrid.training.metric_sinks import build_sinks
from megatron_hybrid.training.nonfinite import NonFiniteCheck, TrainingDivergedError
from megatron_hybrid.training.optimizer import (
    build_optimizer,
    lr_schedule_warning,
    set_learning_rate,
)
from megatron_hybrid.training.profiling import (
    IterationProfiler,
    profiling_placement_problem,
    trace_directory,
)
from megatron_hybrid.training.progress import ProgressReporter
from megatron_hybrid.training.settings import CheckpointSettings, Settings, TrainingSettings
from megatron_hybrid.training.signals import StopRequests

SAMPLE_PROMPT = "The "
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 40


@dataclass
class TrainingResult:
    model: HybridModel  # with pipeline parallelism: this rank's first stage
    parts: list[HybridModel] = field(default_factory=list)  # this rank's stages (or the model)
    losses: list[float] = field(default_factory=list)  # training loss of every iteration
    val_losses: dict[int, float] = field(default_factory=dict)  # iteration -> validation loss
    test_loss: float | None = None  # on the test split after training (data flags with one)
    tokens_per_sec: float = 0.0
    sample: str | None = None
    stopped_by: str | None = None  # the signal the run stopped on (saved, exit status 0)
    iteration: int = 0  # the last iteration trained


class TrainingData(NamedTuple):
    """The sample sources of a run; each serves `.batch(first, count)` of global samples."""

    train: object
    valid: object | None
    test: object | None
    summary: str  # one line for the log
    notes: tuple[str, ...] = ()  # what the data flags left out or do not apply to


def run_training(
    args: argparse.Namespace, reporter: ProgressReporter | None = None
) -> TrainingResult:
    """Train as the flags say; raises ValueError (ConfigError, PatternError, ...) for bad input
    before any training step runs."""
    check_training_args(args)
    settings, model_notes = with_checkpoint_model(settings_from_args(args))
    training = settings.training
    proc = init_distributed(training.device)
    if settings.parallel.fp8_format is not None:  # before any work: a KernelError if FP8 can't run
        bind_fp8(settings.parallel.fp8_format, proc.device)
    if not proc.is_main:  # every rank would print the same warnings: rank 0's are enough
        warnings.simplefilter("ignore")
    dims = settings.parallel.dims(proc.world_size)
    if problem := profiling_placement_problem(settings.profiling, proc.world_size, proc.device):
        raise ValueError(problem)
    tokenizer = build_tokenizer(settings.tokenizer)
    config = settings.model.config(tokenizer.vocab_size)
    dims.check_fits(config)
    num_micro_batches = resolve_global_batch_size(training, dims.dp)
    torch.manual_seed(training.seed)
    data = build_training_data(settings, tokenizer)

    own_reporter = reporter is None
    if own_reporter:
        reporter = ProgressReporter(
            training.train_iters,
            settings.logging.log_dir,
            enabled=proc.is_main,
            bar=not settings.logging.no_progress_bar,
            sinks=(
                build_sinks(settings.logging, lambda: vars(args).copy()) if proc.is_main else []
            ),
        )
    for note in model_notes:
        reporter.message(f"--use-checkpoint-args: {note}")
    kernels = kernels_from_settings(settings.kernels, proc.device)
    reporter.message(kernels.describe())
    if training.bf16 and proc.device.type != "cuda":
        reporter.message("--bf16 applies on CUDA only: this run on the CPU trains in float32")
        training = dataclasses.replace(training, bf16=False)
    trainer = Trainer(
        config,
        training,
        settings.parallel,
        dims,
        dims.build_mesh(proc.device.type),
        proc.device,
        kernels,
        num_micro_batches,
        log=reporter.message,
        save_dir=settings.checkpoint.save,
    )
    reporter.message(
        f"model: pattern {config.hybrid_layer_pattern!r}, {config.pattern.num_blocks} blocks / "
        f"{config.pattern.num_layers} layers, {trainer.num_parameters / 1e6:.2f}M parameters; "
        f"device {proc.device}, {dims.dp} data-parallel x {dims.tp} tensor-parallel x "
        f"{dims.pp} pipeline rank(s); {training.train_iters} iterations of "
        f"{training.global_batch_size} x {training.seq_length} tokens "
        f"({_count(num_micro_batches, 'micro-batch', 'micro-batches')} of "
        f"{training.micro_batch_size} per rank)"
    )
    reporter.message(f"data: {data.summary}")
    for note in data.notes:
        reporter.message(f"data: {note}")

    progress = TrainProgress(lr_schedule=dataclasses.asdict(trainer.lr_schedule))
    if settings.checkpoint.load:
        progress = resume(
            settings.checkpoint, trainer.parts, trainer.optimizer, config, progress, reporter
        )
    result = train(trainer, data, progress, settings, reporter)
    result.iteration = progress.iteration
    if result.stopped_by is not None:  # the scheduler's grace period is short: only the save
        if own_reporter:
            reporter.close()
        return result
    if data.test is not None and settings.logging.eval_iters:
        result.test_loss = trainer.evaluate(data.test, settings.logging.eval_iters)
        reporter.write_metrics({"iteration": progress.iteration, "test_loss": result.test_loss})
        reporter.message(
            f"test split after iteration {progress.iteration}: loss {result.test_loss:.4f}"
        )
    if settings.logging.generate_tokens:
        result.sample = generate_sample(trainer, tokenizer, settings, reporter)
    if own_reporter:
        reporter.close()
    return result


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def build_training_data(settings: Settings, tokenizer: Tokenizer) -> TrainingData:
    """The data settings' datasets, or the embedded corpus (no test split) when they name no
    source. The training loop decides which global samples a rank reads."""
    training = settings.training
    splits = build_datasets(
        settings.data,
        tokenizer,
        training.seq_length,
        training.seed,
        num_train_samples=training.train_iters * training.global_batch_size,
        num_eval_samples=settings.logging.eval_iters * training.global_batch_size,
    )
    if splits is not None:
        if splits.train is None:
            raise ValueError(
                "the data flags leave no training data: give the train split a "
                "share in --split, or --train-data-path"
            )
        return TrainingData(splits.train, splits.valid, splits.test, splits.summary(), splits.notes)
    if not isinstance(tokenizer, ByteTokenizer):
        raise ValueError(
            f"--tokenizer-type {tokenizer.name} without data: the embedded corpus "
            "is byte-level; give --data-path (or --mock-data), or drop the "
            "tokenizer flags"
        )
    train_tokens, valid_tokens = embedded_token_streams(tokenizer)
    train = StreamSampler(train_tokens, training.seq_length, training.seed)
    valid = StreamSampler(valid_tokens, training.seq_length, training.seed, shuffle=False)
    summary = (
        f"embedded corpus (Python help topics), {len(train_tokens)} train / "
        f"{len(valid_tokens)} validation bytes"
    )
    notes = ()
    if settings.data.split != DataSettings().split:
        notes = (
            f"--split {settings.data.split} applies to --data-path datasets; the embedded "
            "corpus has its own train and validation texts",
        )
    return TrainingData(train, valid, None, summary, notes)


def resume(
    checkpoint: CheckpointSettings,
    model: HybridModel,
    optimizer,
    config,
    progress,
    reporter: ProgressReporter,
) -> TrainProgress:
    """Load `checkpoint.load` into model/optimizer/progress as the settings say; a directory
    without any checkpoint means "start from scratch" (so one command both starts and restarts
    a run)."""
    try:
        loaded = load_checkpoint(
            checkpoint.load,
            model,
            None if (checkpoint.finetune or checkpoint.no_load_optim) else optimizer,
            config,
            progress=None if checkpoint.finetune else progress,
            iteration=checkpoint.ckpt_step,
            verify_checksums=not checkpoint.no_verify_checksums,
            log=reporter.message,
        )
    except CheckpointNotFoundError as error:
        if checkpoint.ckpt_step is not None or any(Path(checkpoint.load).glob("iter_*")):
            raise
        reporter.message(f"no checkpoint to load ({error}); training from scratch")
        return progress
    if loaded is None:  # model-only checkpoint (an import) or --finetune
        reporter.message(f"loaded model weights from {checkpoint.load}; starting at iteration 0")
        return progress
    if not checkpoint.no_load_rng:
        loaded.restore_rng()
    if warning := lr_schedule_warning(
        loaded.saved_lr_schedule, loaded.lr_schedule, checkpoint.load
    ):
        reporter.message(warning)
    reporter.message(
        f"resumed from {checkpoint.load} at iteration {loaded.iteration} "
        f"({loaded.consumed_train_samples} samples consumed)"
    )
    return loaded


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over this rank's micro-batches, on the device (no host sync)
    grad_norm: torch.Tensor | None  # before clipping, the same on every rank; None: not
    # computed (no clipping, no check): Trainer.gradient_norm() gives it until the next step
    lr: float


class Trainer:
    """A rank's model parts (the model, or its pipeline stages), parallelized, with their
    optimizer, learning-rate schedule and pipeline: what a training step and an evaluation
    need. benchmarks/train_throughput.py builds one too, so it times what a run does."""

    def __init__(
        self,
        config: ModelConfig,
        training: TrainingSettings,
        parallel: ParallelSettings,
        dims: ParallelDims,
        mesh: DeviceMesh | None,
        device: torch.device,
        kernels: BoundKernels | None,
        num_micro_batches: int,
        log: Callable[[str], None] = print,
        save_dir: str | None = None,
    ):
        self.config, self.dims, self.device = config, dims, device
        self.num_micro_batches = num_micro_batches
        self.micro_batch_size = training.micro_batch_size
        self.sharding_strategy = parallel.sharding_strategy()
        self.share = DataParallelShare(
            mesh["dp_shard"].get_local_rank() if mesh is not None else 0, dims.dp
        )
        self.parts, stage_indices, specs = self._build_parts(
            config, dims, mesh, kernels, training.seed, log
        )
        self.num_parameters = (
            parameter_count(config) if dims.pp > 1 else self.parts[0].num_parameters()
        )
        for index, part in enumerate(self.parts):  # each stage as a whole model; logged once
            parallelize(
                part,
                dims,
                mesh,
                parallel,
                bf16=training.bf16,
                log=log if index == 0 else (lambda _: None),
            )
        optimizers = [
            build_optimizer(
                part,
                training.lr,
                training.weight_decay,
                (training.adam_beta1, training.adam_beta2),
                training.adam_eps,
                foreach=False if dims.tp > 1 or dims.ep > 1 else None,
            )
            for part in self.parts
        ]
        self.optimizer = optimizers[0] if len(self.parts) == 1 else OptimizerParts(optimizers)
        # A fused AdamW clips and skips inside its kernel (its grad_scale and found_inf), so the
        # step needs no host synchronization: the GPU never idles while the host launches it.
        self.update_on_device = all(opt.defaults.get("fused") for opt in optimizers)
        self.lr_schedule = training.lr_schedule()
        self.pipeline = self.tied_sync = None
        if dims.pp > 1:
            self._build_pipeline(config, mesh, parallel, stage_indices, specs, log)
        # Per rank, aux-loss gradients average over its micro-batches (the pipeline schedule
        # divides every gradient by the micro-batch count itself); data parallelism averages
        # over ranks.
        for part in self.parts:
            part.set_aux_loss_grad_scale(1.0 if self.pipeline else 1.0 / num_micro_batches)
        self.autocast = _bf16_autocast if training.bf16 else contextlib.nullcontext
        self.max_grad_norm = training.clip_grad if training.clip_grad > 0 else math.inf
        # The last stage's copy of the embedding counts once (on the first stage) in the norm.
        self.tied_copies = [
            part.embedding.word_embeddings.weight
            for part in self.parts
            if part.holds_embedding_copy
        ]
        self.counted = [
            p
            for part in self.parts
            for p in part.parameters()
            if not any(p is copy for copy in self.tied_copies)
        ]
        self.count_reduction = self._expert_count_reduction(mesh)
        self.nonfinite = NonFiniteCheck(
            training.check_for_nan_in_loss_and_grad,
            training.skip_nonfinite_iterations,
            log,
            advice_on_stop=lambda: (
                f"Checkpoints in {save_dir} hold earlier, finite states "
                f"(resume with --load {save_dir}). "
                if save_dir
                else ""
            ),
        )

    def _build_parts(self, config, dims, mesh, kernels, seed, log):
        """(parts, their global stage indices, their StageSpecs) of this rank, unparallelized."""
        if dims.pp == 1:
            return [HybridModel(config, seed=seed, kernels=kernels).to(self.device)], [0], []
        stage_indices, specs = rank_stage_specs(
            config, dims.pp, mesh["pp"].get_local_rank(), warn=log
        )
        parts = [
            HybridModel(config, seed=seed, kernels=kernels, stage=spec).to(self.device)
            for spec in specs
        ]
        return parts, stage_indices, specs

    def _build_pipeline(self, config, mesh, parallel, stage_indices, specs, log) -> None:
        num_stages = len(stage_blocks(config.pattern, self.dims.pp))
        schedule_name = parallel.pipeline_schedule or default_schedule(len(self.parts))
        self.pipeline = Pipeline(
            self.parts,
            stage_indices,
            num_stages,
            mesh["pp"],
            schedule_name,
            self.num_micro_batches,
            self.device,
        )
        if config.tie_word_embeddings or config.pattern.mtp_depths:  # an embedding copy
            self.tied_sync = TiedEmbeddingSync(mesh, self.parts)
        log(
            f"pipeline: {num_stages} stages over {self.dims.pp} ranks ({schedule_name}); this "
            f"rank holds stages {stage_indices} = blocks {[list(s.blocks) for s in specs]}"
        )

    def _expert_count_reduction(self, mesh):
        """Expert-bias updates use token counts summed over the data-parallel ranks (each routes
        its own tokens; tensor-parallel ranks route the same ones, other stages hold other
        layers); None with one data-parallel rank."""
        if self.dims.dp == 1:
            return None
        dp_group = mesh["dp_shard"].get_group()
        return lambda counts: all_reduce_sum_(counts, group=dp_group)

    def train_step(self, iteration: int, micro_batches: list[torch.Tensor]) -> StepResult:
        """One optimizer step on this rank's micro-batches (each (micro batch, seq + 1) token
        ids): forward and backward of each, gradients clipped, then the update, unless the
        non-finite check skips it (or raises TrainingDivergedError to stop: for the previous
        iteration, when the check runs on the device)."""
        lr = self.lr_schedule(iteration)
        set_learning_rate(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = self.forward_backward(micro_batches)
        self.nonfinite.settle()  # the previous iteration's, done on the GPU by now
        pipeline_group = self.pipeline.group if self.pipeline else None
        if self.update_on_device:
            clipping = math.isfinite(self.max_grad_norm)
            # The norm reads every gradient: only clipping and the check need it each step
            # (a log line computes its own, `gradient_norm()`, from the gradients left).
            grad_norm = None
            if clipping or self.nonfinite.enabled:
                grad_norm = gradient_norm(self.counted, pipeline_group)
            found_inf = self.nonfinite.device_flag(loss_sum, grad_norm)
            divisor = clip_divisor(grad_norm, self.max_grad_norm) if clipping else None
            for optimizer in as_optimizers(self.optimizer):
                _fused_step(optimizer, divisor, found_inf)
            keep = None if found_inf is None else 1.0 - found_inf
            for part in self.parts:
                part.update_expert_biases(self.count_reduction, keep)
            self.nonfinite.defer(iteration, loss_sum, grad_norm, found_inf)
            return StepResult(loss_sum / self.num_micro_batches, grad_norm, lr)
        grad_norm = clip_grad_norm(
            self.counted,
            self.max_grad_norm,
            copies=self.tied_copies,
            pipeline_group=pipeline_group,
        )
        if self.nonfinite.update_allowed(iteration, loss_sum, grad_norm):
            self.optimizer.step()
            for part in self.parts:
                part.update_expert_biases(self.count_reduction)
        else:
            for part in self.parts:
                part.discard_routing_counts()
        return StepResult(loss_sum / self.num_micro_batches, grad_norm, lr)

    def gradient_norm(self) -> torch.Tensor:
        """The global norm of the gradients the last step left (unclipped unless it clipped)."""
        return gradient_norm(self.counted, self.pipeline.group if self.pipeline else None)

    def settle(self) -> None:
        """Judge the last iteration's deferred non-finite check (before a save, a log line, an
        evaluation or the end of the run): raises TrainingDivergedError to stop."""
        self.nonfinite.settle()

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate the gradients of the mean loss over `micro_batches` (each micro-batch's
        loss is its own token mean); returns the sum of their losses (device, detached)."""
        loss_sum = torch.zeros((), device=self.device)
        if self.pipeline:
            batch = to_device(torch.cat(micro_batches), self.device)
            with self.autocast():
                loss = self.pipeline.train_step(batch[:, :-1], batch[:, 1:])
            if loss is not None:  # the last stage; x pp, so the mean over all ranks is right
                loss_sum += loss * self.num_micro_batches * self.dims.pp
            if self.tied_sync is not None:
                self.tied_sync()
            return loss_sum
        model = self.parts[0]
        for micro, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            if self.dims.dp > 1:  # reduce gradients once, after the last micro-batch
                prepare_micro_batch(
                    model, self.sharding_strategy, last=micro == self.num_micro_batches - 1
                )
            with self.autocast():
                loss = model(batch[:, :-1], batch[:, 1:])
            (loss / self.num_micro_batches).backward()
            loss_sum += loss.detach()
        return loss_sum

    @torch.no_grad()
    def evaluate(self, source, iters: int) -> float:
        """Mean loss over a fixed evaluation set (the first samples of `source`, not shuffled):
        `iters` global batches as in Megatron-LM, or the whole set when it is smaller, read as
        data/sharding.py says, so the loss is that of the same samples under every layout. Every
        rank evaluates the same number of micro-batches (FSDP and the pipeline run them in
        lockstep). A pipeline evaluates a whole batch of micro-batches at a time; the ranks
        holding the last stage weight its loss by pp, so the mean over all ranks is the mean
        over data-parallel ranks."""
        pipeline = self.pipeline
        multiple = self.num_micro_batches if pipeline else 1
        reads = self.share.evaluation_reads(
            source.num_samples,
            iters * self.num_micro_batches * self.micro_batch_size,
            self.micro_batch_size * multiple,
            whole_reads=multiple > 1,
        )
        loss_weight = 1.0 if not pipeline else (self.dims.pp if pipeline.has_last else 0.0)
        for part in self.parts:
            part.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for first, count in reads:
            batch = to_device(source.batch(first, count), self.device)
            with self.autocast():
                loss = (
                    pipeline.eval_step(batch[:, :-1], batch[:, 1:])
                    if pipeline
                    else self.parts[0](batch[:, :-1], batch[:, 1:])
                )
            value = 0.0 if loss is None else float(loss) * loss_weight
            total += torch.tensor([value * count, count], dtype=torch.float64)
        for part in self.parts:
            part.train()
        total = all_reduce_mean(total)  # the ratio of means is the ratio of sums
        return float(total[0] / total[1])


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of token ids on `device`. A CPU batch goes to a GPU through pinned memory without
    blocking: a plain copy from pageable memory waits for the whole queue, so the GPU would idle
    while the host reads the next batch and launches the next step."""
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def _fused_step(
    optimizer: torch.optim.Optimizer,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """A fused optimizer's step dividing every gradient by `grad_scale` and skipped entirely
    (parameters, moments and step count) where `found_inf` is 1.0, both read on the device: the
    hooks torch's fused Adam kernels offer `torch.amp.GradScaler`."""
    optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def _bf16_autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def train(
    trainer: Trainer,
    data: TrainingData,
    progress: TrainProgress,
    settings: Settings,
    reporter: ProgressReporter,
) -> TrainingResult:
    """The loop, from the iteration after `progress` to the last (or an --exit-interval): read
    the global batch's share, step, log every log interval, save, evaluate."""
    training = settings.training
    result = TrainingResult(model=trainer.parts[0], parts=trainer.parts)
    saver = None
    if settings.checkpoint.save:
        saver = CheckpointSaver(
            settings.checkpoint.save,
            keep_last=settings.checkpoint.keep_last,
            async_save=settings.checkpoint.async_save,
            log=reporter.message,
            attachment=tokenizer_attachment(settings.tokenizer),
        )
    window = LogWindow(reporter, trainer, training)
    reporter.begin(progress.iteration)
    trainer.parts[0].train()
    stops = StopRequests(
        training.exit_signal, training.exit_signal_handler, reporter.message, trainer.device
    )
    profiler = build_profiler(settings, progress.iteration, trainer.device, reporter)
    try:
        with stops, profiler:
            while progress.iteration < training.train_iters:
                profiler.before_iteration(progress.iteration + 1)
                if not _train_iteration(
                    trainer, data, progress, settings, saver, window, result, stops
                ):
                    break
            trainer.settle()
    except TrainingDivergedError:
        if saver is not None:
            saver.finalize()  # earlier saves in flight are of finite states: complete them
        raise
    if saver is not None:
        saver.finalize()
    return result


def build_profiler(
    settings: Settings,
    resumed_iteration: int,
    device: torch.device,
    reporter: ProgressReporter,
) -> IterationProfiler:
    """The profiler of this rank's loop (the profiling flags; a no-op without --profile). The
    rank that wrote a trace says where: rank 0 through the reporter, others (whose reporter is
    silent) on their own output."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    logging = settings.logging
    trace_dir = None
    if settings.profiling.profile and settings.profiling.use_pytorch_profiler:
        trace_dir = trace_directory(logging.tensorboard_dir, logging.log_dir)
    return IterationProfiler(
        settings.profiling,
        trace_dir,
        rank,
        resumed_iteration,
        device,
        log=reporter.message if rank == 0 else (lambda text: print(text, flush=True)),
    )


def _train_iteration(
    trainer: Trainer,
    data: TrainingData,
    progress: TrainProgress,
    settings: Settings,
    saver: CheckpointSaver | None,
    window: LogWindow,
    result: TrainingResult,
    stops: StopRequests,
) -> bool:
    """One iteration of the loop, with its logging, saving and evaluation; False to stop here
    (an --exit-interval, or a stop signal: then saved, not evaluated). Each of those first
    settles the non-finite check (a host synchronization they make anyway), so none of them
    sees an iteration the check would stop at."""
    training, logging, reporter = settings.training, settings.logging, window.reporter
    iteration = progress.iteration + 1
    micro_batches = [
        data.train.batch(first, count)
        for first, count in trainer.share.training_reads(
            progress.consumed_train_samples,
            trainer.num_micro_batches,
            training.micro_batch_size,
        )
    ]
    step = trainer.train_step(iteration, micro_batches)
    window.add(step.loss)
    progress.iteration = iteration
    progress.consumed_train_samples += training.global_batch_size
    last = iteration == training.train_iters
    result.stopped_by = stops.poll()
    exiting = bool(training.exit_interval) and iteration % training.exit_interval == 0
    stopping = exiting or result.stopped_by is not None
    if iteration % logging.log_interval == 0 or last or stopping:
        trainer.settle()
        window.log(iteration, step, trainer, result, progress.consumed_train_samples)
    if saver is not None:
        saver.poll()
        interval = settings.checkpoint.save_interval
        if (interval and iteration % interval == 0) or stopping or last:
            trainer.settle()
            saver.save(iteration, trainer.parts, trainer.optimizer, progress, trainer.config)
    if result.stopped_by is not None:
        saved = "saved" if saver is not None else "not saved (no --save)"
        reporter.message(f"stopped by {result.stopped_by} at iteration {iteration}; {saved}")
        return False
    if (
        data.valid is not None
        and logging.eval_iters
        and (iteration % logging.eval_interval == 0 or last)
    ):
        trainer.settle()
        result.val_losses[iteration] = trainer.evaluate(data.valid, logging.eval_iters)
        reporter.log_eval(iteration, result.val_losses[iteration])
        window.restart_clock()  # evaluation time is not training throughput
    if exiting:
        reporter.message(f"exiting at iteration {iteration} (--exit-interval)")
        return False
    return True


class LogWindow:
    """The iterations since the last log line: their losses stay on the device until the line
    (one host sync per log interval), and their throughput: tokens per second, and per GPU
    model TFLOP/s and MFU (against the GPU's dense bf16 peak, in bf16 runs on a known GPU)."""

    def __init__(self, reporter: ProgressReporter, trainer: Trainer, training: TrainingSettings):
        self.reporter = reporter
        self.tokens_per_iter = training.global_batch_size * training.seq_length
        self.flops_per_token = training_flops_per_token(trainer.config, training.seq_length)
        self.num_ranks = dist.get_world_size() if dist.is_initialized() else 1
        self.on_gpu = trainer.device.type == "cuda"
        self.peak_tflops = None
        if self.on_gpu and training.bf16:
            self.peak_tflops = peak_bf16_tflops(torch.cuda.get_device_name(trainer.device))
        self.pending: list[torch.Tensor] = []
        self.iters, self.start = 0, reporter.elapsed()

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        self.iters += 1

    def restart_clock(self) -> None:
        self.start = self.reporter.elapsed()

    def throughput(self, tokens_per_sec: float) -> dict[str, float]:
        """Per GPU tokens/s, TFLOP/s and MFU (on CPU: the run's TFLOP/s)."""
        tflops = self.flops_per_token * tokens_per_sec / 1e12
        if not self.on_gpu:
            return {"tflops_per_gpu": tflops / self.num_ranks} if self.num_ranks == 1 else {}
        values = {
            "tokens_per_sec_per_gpu": tokens_per_sec / self.num_ranks,
            "tflops_per_gpu": tflops / self.num_ranks,
        }
        if self.peak_tflops:
            values["mfu"] = values["tflops_per_gpu"] / self.peak_tflops
        return values

    def log(
        self,
        iteration: int,
        step: StepResult,
        trainer: Trainer,
        result: TrainingResult,
        consumed_samples: int,
    ) -> None:
        """One line and metrics.jsonl record for `iteration`; the window's losses (averaged
        over all ranks, one collective) go to `result.losses`."""
        result.losses.extend(all_reduce_mean(torch.stack(self.pending).double().cpu()).tolist())
        now = self.reporter.elapsed()
        result.tokens_per_sec = self.iters * self.tokens_per_iter / max(now - self.start, 1e-9)
        self.pending, self.iters, self.start = [], 0, now
        extra = {"consumed_samples": consumed_samples}
        extra.update(self.throughput(result.tokens_per_sec))
        aux = [a for part in trainer.parts if (a := part.moe_aux_loss()) is not None]
        if aux:  # this rank's MoE layers (with pipelining: its stages')
            extra["moe_aux_loss"] = sum(aux)
        if trainer.config.pattern.mtp_depths:  # a collective: every rank takes part
            extra.update(mtp_losses(trainer.parts, trainer.config.pattern.mtp_depths))
        if trainer.nonfinite.skipped:
            extra["skipped_iterations"] = trainer.nonfinite.skipped
        if self.on_gpu:
            extra["peak_memory_gib"] = round(
                torch.cuda.max_memory_allocated(trainer.device) / 2**30, 2
            )
        self.reporter.log_iteration(
            iteration,
            result.losses[-1],
            step.lr,
            float(step.grad_norm if step.grad_norm is not None else trainer.gradient_norm()),
            result.tokens_per_sec,
            extra,
        )


def mtp_losses(parts: list[HybridModel], depths: int) -> dict[str, float]:
    """The MTP losses of the training forwards since the last call, averaged over them and over
    all ranks (those holding no MTP contribute nothing): `mtp_loss` (the mean over depths, the
    term scaled by --mtp-loss-scaling-factor) and `mtp_{k}_loss` per depth k."""
    taken = torch.zeros(depths + 1, dtype=torch.float64)
    for part in parts:
        if part.mtp is not None:
            taken += part.mtp.take_logged_losses().double().cpu()
    sums = all_reduce_mean(taken)  # the ratio of means is the ratio of sums
    per_depth = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
    values = {f"mtp_{k}_loss": loss for k, loss in enumerate(per_depth, start=1)}
    return {"mtp_loss": sum(per_depth) / depths, **values}


def generate_sample(
    trainer: Trainer, tokenizer: Tokenizer, settings: Settings, reporter: ProgressReporter
) -> str | None:
    """A sample of `generate_tokens` tokens after SAMPLE_PROMPT, printed; None (and a note)
    under pipeline parallelism."""
    if trainer.pipeline:
        reporter.message(
            "sample generation runs with pipeline size 1 only; skipped (save a "
            "checkpoint and sample from it with megatron-hybrid-generate)"
        )
        return None
    try:
        prompt_text, prompt = SAMPLE_PROMPT, tokenizer.encode(SAMPLE_PROMPT)
    except ValueError:  # a tokenizer of ids (NullTokenizer): start from end-of-document
        prompt_text, prompt = "", np.array([tokenizer.eod])
    # The same path as megatron-hybrid-generate: a plain whole model (gathered from the
    # parallel part on every rank), decoded with state.
    sampling = Sampling(SAMPLE_TEMPERATURE, SAMPLE_TOP_K, seed=settings.training.seed)
    (new,) = generate(
        whole_model(trainer.parts[0]),
        [torch.from_numpy(np.asarray(prompt, dtype=np.int64))],
        settings.logging.generate_tokens,
        sampling,
        vocab_limit=tokenizer.vocab_size,
    )
    sample = prompt_text + tokenizer.decode(new)
    reporter.message("sample:\n" + sample)
    return sample
