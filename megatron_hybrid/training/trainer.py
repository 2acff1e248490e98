"""The training loop: one linear function from flags to a trained model, on one process or
every rank of a torchrun launch (data parallel with FSDP2, tensor parallel with DTensor,
pipeline parallel with torch.distributed.pipelining).

A rank trains its model *parts*: the whole model, or with pipeline parallelism the stages it
holds. Each part gets tensor parallelism, activation checkpointing and FSDP as a whole model
would, and its own optimizer."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megatron_hybrid.checkpointing.errors import CheckpointNotFoundError
from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
from megatron_hybrid.checkpointing.parts import OptimizerParts
from megatron_hybrid.checkpointing.state import TrainProgress
from megatron_hybrid.data.builder import build_datasets
from megatron_hybrid.data.embedded import embedded_token_streams
from megatron_hybrid.data.sampler import StreamSampler
from megatron_hybrid.data.tokenizer import ByteTokenizer, build_tokenizer
from megatron_hybrid.flops import parameter_count
from megatron_hybrid.generation import generate
from megatron_hybrid.kernels.cli import kernels_from_args
from megatron_hybrid.model import HybridModel
from megatron_hybrid.parallel.activation_checkpoint import apply_activation_checkpointing
from megatron_hybrid.parallel.compile import apply_compile
from megatron_hybrid.parallel.dims import ParallelDims
from megatron_hybrid.parallel.distributed import (
    all_reduce_mean,
    all_reduce_sum_,
    init_distributed,
)
from megatron_hybrid.parallel.expert_parallel import apply_expert_parallel
from megatron_hybrid.parallel.fsdp import apply_fsdp
from megatron_hybrid.parallel.grad_norm import clip_grad_norm
from megatron_hybrid.parallel.pipeline import (
    Pipeline,
    TiedEmbeddingSync,
    default_schedule,
    rank_stage_specs,
    stage_blocks,
)
from megatron_hybrid.parallel.tensor_parallel import apply_tensor_parallel
from megatron_hybrid.training.arguments import (
    check_training_args,
    model_config_from_args,
    resolve_global_batch_size,
)
from megatron_hybrid.training.nonfinite import NonFiniteCheck, TrainingDivergedError
from megatron_hybrid.training.optimizer import (
    LRSchedule,
    build_optimizer,
    lr_schedule_warning,
    set_learning_rate,
)
from megatron_hybrid.training.progress import ProgressReporter

SAMPLE_PROMPT = "The "


@dataclass
class TrainingResult:
    model: HybridModel  # with pipeline parallelism: this rank's first stage
    parts: list[HybridModel] = field(default_factory=list)  # this rank's stages (or the model)
    losses: list[float] = field(default_factory=list)  # training loss of every iteration
    val_losses: dict[int, float] = field(default_factory=dict)  # iteration -> validation loss
    test_loss: float | None = None  # on the test split after training (data flags with one)
    tokens_per_sec: float = 0.0
    sample: str | None = None


def language_model_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 (nats per token)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten())


def model_loss(model: HybridModel):
    """batch (B, T+1) -> mean next-token loss of `model` on it."""
    return lambda batch: model(batch[:, :-1], batch[:, 1:])


@torch.no_grad()
def evaluate(batch_loss, parts: list[HybridModel], sampler: StreamSampler, iters: int,
             micro_batch_size: int, device: torch.device, autocast, rank: int = 0,
             world: int = 1, micro_batches_per_iter: int = 1, batch_multiple: int = 1,
             loss_weight: float = 1.0) -> float:
    """Mean loss over a fixed validation set (the first samples, not shuffled): `iters` global
    batches as in Megatron-LM (each `micro_batches_per_iter` micro-batches on each of `world`
    data-parallel ranks), or the whole set when it is smaller. So the loss is that of the same
    samples under every layout. Every rank evaluates the same number of micro-batches (FSDP and
    the pipeline run them in lockstep).

    `batch_loss(batch)` is the loss of a batch, or None on ranks that do not compute it (a
    pipeline's inner stages); a pipeline evaluates `batch_multiple` micro-batches at a time and
    weights the loss by `loss_weight` (its size) on the ranks that hold it, so the mean over all
    ranks is the mean over data-parallel ranks."""
    for part in parts:
        part.eval()
    step = micro_batch_size * batch_multiple
    per_rank = min(iters * micro_batches_per_iter * micro_batch_size,
                   sampler.num_samples // world)
    if batch_multiple > 1:
        per_rank = max(per_rank // step, 1) * step
    total = torch.zeros(2, dtype=torch.float64)
    for offset in range(0, per_rank, step):
        count = min(step, per_rank - offset)
        batch = sampler.batch(rank * per_rank + offset, count).to(device)
        with autocast():
            loss = batch_loss(batch)
        value = 0.0 if loss is None else float(loss) * loss_weight
        total += torch.tensor([value * count, count], dtype=torch.float64)
    for part in parts:
        part.train()
    total = all_reduce_mean(total)  # the ratio of means is the ratio of sums
    return float(total[0] / total[1])


def build_training_data(args: argparse.Namespace, tokenizer):
    """(train, validation or None, test or None, one-line description): the data flags'
    datasets, or the embedded corpus (no test split) when no data flag is given. Each object
    serves `.batch(first, size)`; the training loop decides which global samples a rank reads."""
    eval_samples = args.eval_iters * args.global_batch_size
    splits = build_datasets(args, tokenizer, args.seq_length, args.seed,
                            num_train_samples=args.train_iters * args.global_batch_size,
                            num_eval_samples=eval_samples)
    if splits is not None:
        if splits.train is None:
            raise ValueError("the data flags leave no training data: give the train split a "
                             "share in --split, or --train-data-path")
        return splits.train, splits.valid, splits.test, splits.summary()
    if not isinstance(tokenizer, ByteTokenizer):
        raise ValueError(f"--tokenizer-type {tokenizer.name} without data: the embedded corpus "
                         "is byte-level; give --data-path (or --mock-data), or drop the "
                         "tokenizer flags")
    train_tokens, valid_tokens = embedded_token_streams(tokenizer)
    train = StreamSampler(train_tokens, args.seq_length, args.seed)
    valid = StreamSampler(valid_tokens, args.seq_length, args.seed, shuffle=False)
    summary = (f"embedded corpus (Python help topics), {len(train_tokens)} train / "
               f"{len(valid_tokens)} validation bytes")
    return train, valid, None, summary


def resume(args: argparse.Namespace, model: HybridModel, optimizer, config, progress,
           reporter: ProgressReporter) -> TrainProgress:
    """Load --load into model/optimizer/progress as the flags say; a directory without any
    checkpoint means "start from scratch" (so one command both starts and restarts a run)."""
    try:
        loaded = load_checkpoint(
            args.load, model, None if (args.finetune or args.no_load_optim) else optimizer,
            config, progress=None if args.finetune else progress, iteration=args.ckpt_step,
            verify_checksums=not args.no_verify_checksums, log=reporter.message)
    except CheckpointNotFoundError as error:
        if args.ckpt_step is not None or any(Path(args.load).glob("iter_*")):
            raise
        reporter.message(f"no checkpoint to load ({error}); training from scratch")
        return progress
    if loaded is None:  # model-only checkpoint (an import) or --finetune
        reporter.message(f"loaded model weights from {args.load}; starting at iteration 0")
        return progress
    if not args.no_load_rng:
        loaded.restore_rng()
    if warning := lr_schedule_warning(loaded.saved_lr_schedule, loaded.lr_schedule, args.load):
        reporter.message(warning)
    reporter.message(f"resumed from {args.load} at iteration {loaded.iteration} "
                     f"({loaded.consumed_train_samples} samples consumed)")
    return loaded


def run_training(args: argparse.Namespace, reporter: ProgressReporter | None = None
                 ) -> TrainingResult:
    """Train as the flags say; raises ValueError (ConfigError, PatternError, ...) for bad input
    before any training step runs."""
    check_training_args(args)
    proc = init_distributed(args.device)
    device = proc.device
    dims = ParallelDims(proc.world_size, args.tensor_model_parallel_size,
                        args.pipeline_model_parallel_size, args.expert_model_parallel_size,
                        pipeline_schedule=args.pipeline_schedule)
    tokenizer = build_tokenizer(args)
    config = model_config_from_args(args, tokenizer.vocab_size)
    dims.check_fits(config)
    num_micro_batches = resolve_global_batch_size(args, dims.dp)
    torch.manual_seed(args.seed)
    train_data, valid_data, test_data, data_summary = build_training_data(args, tokenizer)

    own_reporter = reporter is None
    if own_reporter:
        reporter = ProgressReporter(args.train_iters, args.log_dir, enabled=proc.is_main,
                                    live=False if args.no_progress_bar else None)
    kernels = kernels_from_args(args, device)
    reporter.message(kernels.describe())
    mesh = dims.build_mesh(device.type)
    dp_rank = mesh["dp_shard"].get_local_rank() if mesh is not None else 0
    if dims.pp > 1:
        stage_indices, specs = rank_stage_specs(config, dims.pp, mesh["pp"].get_local_rank(),
                                                warn=reporter.message)
        parts = [HybridModel(config, seed=args.seed, kernels=kernels, stage=spec).to(device)
                 for spec in specs]
        num_parameters = parameter_count(config)
    else:
        parts = [HybridModel(config, seed=args.seed, kernels=kernels).to(device)]
        num_parameters = parts[0].num_parameters()
    # Order of application: TP -> activation checkpointing ->
    # compile -> FSDP; per part, so each pipeline stage is sharded as a whole model would be.
    use_fsdp = dims.dp > 1
    for index, part in enumerate(parts):
        log = reporter.message if index == 0 else (lambda _: None)
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], sequence_parallel=args.sequence_parallel,
                                  log=log)
        apply_expert_parallel(part, mesh, log=log)
        if args.recompute_granularity:
            apply_activation_checkpointing(part, args.recompute_granularity, log=log)
        if args.compile:
            apply_compile(part, mode=args.compile_mode, log=log)
        if use_fsdp:
            apply_fsdp(part, mesh, bf16=args.bf16, log=log)
    optimizers = [build_optimizer(part, args.lr, args.weight_decay,
                                  (args.adam_beta1, args.adam_beta2), args.adam_eps,
                                  foreach=False if dims.tp > 1 or dims.ep > 1 else None)
                  for part in parts]
    optimizer = optimizers[0] if len(parts) == 1 else OptimizerParts(optimizers)
    model = parts[0]
    schedule = LRSchedule(args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters,
                          args.lr_decay_style)
    pipeline = tied_sync = None
    if dims.pp > 1:
        num_stages = len(stage_blocks(config.pattern, dims.pp))
        schedule_name = args.pipeline_schedule or default_schedule(len(parts))
        pipeline = Pipeline(parts, stage_indices, num_stages, mesh["pp"], schedule_name,
                            num_micro_batches, language_model_loss, device)
        if config.tie_word_embeddings:
            tied_sync = TiedEmbeddingSync(mesh, parts)
        reporter.message(
            f"pipeline: {num_stages} stages over {dims.pp} ranks ({schedule_name}); this rank "
            f"holds stages {stage_indices} = blocks "
            f"{[list(spec.blocks) for spec in specs]}")
    # Per rank, aux-loss gradients average over its micro-batches (the pipeline schedule
    # divides every gradient by the micro-batch count itself); FSDP averages over ranks.
    for part in parts:
        part.set_moe_aux_loss_grad_scale(1.0 if pipeline else 1.0 / num_micro_batches)
    if args.bf16:
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    reporter.message(
        f"model: pattern {config.hybrid_layer_pattern!r}, {config.pattern.num_blocks} blocks / "
        f"{config.pattern.num_layers} layers, {num_parameters / 1e6:.2f}M parameters; "
        f"device {device}, {dims.dp} data-parallel x {dims.tp} tensor-parallel x {dims.pp} "
        f"pipeline rank(s); {args.train_iters} iterations of "
        f"{args.global_batch_size} x {args.seq_length} tokens ({num_micro_batches} micro-batches "
        f"of {args.micro_batch_size} per rank)"
    )
    reporter.message(f"data: {data_summary}")

    progress = TrainProgress(lr_schedule=dataclasses.asdict(schedule))
    if args.load:
        progress = resume(args, parts, optimizer, config, progress, reporter)
    saver = None
    if args.save:
        saver = CheckpointSaver(args.save, keep_last=args.keep_last, async_save=args.async_save,
                                log=reporter.message)

    # Expert-bias updates use token counts summed over the data-parallel ranks (each routes its
    # own tokens; tensor-parallel ranks route the same ones, other stages hold other layers).
    count_reduction = None
    if use_fsdp:
        dp_group = mesh["dp_shard"].get_group()
        def count_reduction(counts: torch.Tensor) -> None:
            all_reduce_sum_(counts, group=dp_group)
    result = TrainingResult(model=model, parts=parts)
    # The last stage's copy of a tied embedding counts once (on the first stage) in the norm.
    tied_copies = [part.embedding.word_embeddings.weight for part in parts
                   if part.holds_tied_output_copy]
    counted = [p for part in parts for p in part.parameters()
               if not any(p is copy for copy in tied_copies)]
    if pipeline:
        def batch_loss(batch):
            return pipeline.eval_step(batch[:, :-1], batch[:, 1:])
        eval_args = dict(batch_multiple=num_micro_batches,
                         loss_weight=dims.pp if pipeline.has_last else 0.0)
    else:
        batch_loss, eval_args = model_loss(model), {}
    eval_args["micro_batches_per_iter"] = num_micro_batches
    nonfinite = NonFiniteCheck(
        args.check_for_nan_in_loss_and_grad, args.skip_nonfinite_iterations, reporter.message,
        advice_on_stop=lambda: (f"Checkpoints in {args.save} hold earlier, finite states "
                                f"(resume with --load {args.save}). " if args.save else ""))
    pending: list[torch.Tensor] = []  # losses not yet copied to the host (one sync per log)
    tokens_per_iter = args.global_batch_size * args.seq_length
    consumed_samples = progress.consumed_train_samples
    window_start, window_iters = reporter.elapsed(), 0
    model.train()
    for iteration in range(progress.iteration + 1, args.train_iters + 1):
        lr = schedule(iteration)
        set_learning_rate(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        # Micro-step j covers global samples [j*dp*mbs, (j+1)*dp*mbs) of this iteration's
        # batch; rank r reads only its contiguous micro-batch of them.
        micro_batches = [
            train_data.batch(consumed_samples + (micro * dims.dp + dp_rank)
                             * args.micro_batch_size, args.micro_batch_size)
            for micro in range(num_micro_batches)]
        if pipeline:
            batch = torch.cat(micro_batches).to(device)
            with autocast():
                loss = pipeline.train_step(batch[:, :-1], batch[:, 1:])
            if loss is not None:  # the last stage; x pp, so the mean over all ranks is right
                loss_sum += loss * num_micro_batches * dims.pp
            if tied_sync is not None:
                tied_sync()
        else:
            for micro, batch in enumerate(micro_batches):
                batch = batch.to(device)
                if use_fsdp:  # FSDP2: reduce-scatter gradients once, after the last one
                    model.set_requires_gradient_sync(micro == num_micro_batches - 1)
                with autocast():
                    loss = model(batch[:, :-1], batch[:, 1:])
                (loss / num_micro_batches).backward()
                loss_sum += loss.detach()
        consumed_samples += args.global_batch_size
        max_norm = args.clip_grad if args.clip_grad > 0 else math.inf
        grad_norm = clip_grad_norm(counted, max_norm, copies=tied_copies,
                                   pipeline_group=pipeline.group if pipeline else None)
        try:
            update = nonfinite.update_allowed(iteration, loss_sum, grad_norm)
        except TrainingDivergedError:
            if saver is not None:
                saver.finalize()  # earlier saves in flight are of finite states: complete them
            raise
        if update:
            optimizer.step()
            for part in parts:
                part.update_expert_biases(count_reduction)
        else:
            for part in parts:
                part.discard_routing_counts()
        pending.append(loss_sum / num_micro_batches)
        window_iters += 1
        progress.iteration, progress.consumed_train_samples = iteration, consumed_samples
        exiting = bool(args.exit_interval) and iteration % args.exit_interval == 0
        if saver is not None:
            saver.poll()
            if (args.save_interval and iteration % args.save_interval == 0) or exiting or (
                    iteration == args.train_iters):
                saver.save(iteration, parts, optimizer, progress, config)

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            # One collective per log interval: the mean of every rank's loss per iteration.
            result.losses.extend(all_reduce_mean(torch.stack(pending).double().cpu()).tolist())
            pending.clear()
            now = reporter.elapsed()
            tokens_per_sec = window_iters * tokens_per_iter / max(now - window_start, 1e-9)
            window_start, window_iters = now, 0
            result.tokens_per_sec = tokens_per_sec
            extra = {}
            aux = [a for part in parts if (a := part.moe_aux_loss()) is not None]
            if aux:  # this rank's MoE layers (with pipelining: its stages')
                extra["moe_aux_loss"] = sum(aux)
            if nonfinite.skipped:
                extra["skipped_iterations"] = nonfinite.skipped
            if device.type == "cuda":
                extra["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            reporter.log_iteration(iteration, result.losses[-1], lr, float(grad_norm),
                                   tokens_per_sec, extra)
        if valid_data is not None and args.eval_iters and (iteration % args.eval_interval == 0
                                or iteration == args.train_iters):
            val_loss = evaluate(batch_loss, parts, valid_data, args.eval_iters,
                                args.micro_batch_size, device, autocast, dp_rank, dims.dp,
                                **eval_args)
            result.val_losses[iteration] = val_loss
            reporter.log_eval(iteration, val_loss)
            window_start = reporter.elapsed()  # evaluation time is not training throughput
        if exiting:
            reporter.message(f"exiting at iteration {iteration} (--exit-interval)")
            break

    if saver is not None:
        saver.finalize()
    if test_data is not None and args.eval_iters:
        test_loss = evaluate(batch_loss, parts, test_data, args.eval_iters,
                             args.micro_batch_size, device, autocast, dp_rank, dims.dp,
                             **eval_args)
        result.test_loss = test_loss
        reporter.write_metrics({"iteration": progress.iteration, "test_loss": test_loss})
        reporter.message(f"test split after iteration {progress.iteration}: loss "
                         f"{test_loss:.4f}")
    if args.generate_tokens and pipeline:
        reporter.message("sample generation runs with pipeline size 1 only; skipped (save a "
                         "checkpoint and generate from it in one process)")
    elif args.generate_tokens:
        try:
            prompt_text, prompt = SAMPLE_PROMPT, tokenizer.encode(SAMPLE_PROMPT)
        except ValueError:  # a tokenizer of ids (NullTokenizer): start from end-of-document
            prompt_text, prompt = "", np.array([tokenizer.eod])
        new = generate(model, torch.from_numpy(np.asarray(prompt, dtype=np.int64)),
                       args.generate_tokens, args.seq_length, vocab_limit=tokenizer.vocab_size,
                       seed=args.seed)
        result.sample = prompt_text + tokenizer.decode(new)
        reporter.message("sample:\n" + result.sample)
    if own_reporter:
        reporter.close()
    return result
