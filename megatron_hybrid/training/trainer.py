"""The training loop, single process: one linear function from flags to a trained model."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_hybrid.checkpointing.errors import CheckpointNotFoundError
from megatron_hybrid.checkpointing.manager import CheckpointSaver, load_checkpoint
from megatron_hybrid.checkpointing.state import TrainProgress
from megatron_hybrid.data.embedded import embedded_token_streams
from megatron_hybrid.data.sampler import StreamSampler
from megatron_hybrid.data.tokenizer import ByteTokenizer
from megatron_hybrid.generation import generate
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import check_training_args, model_config_from_args
from megatron_hybrid.training.optimizer import LRSchedule, build_optimizer, set_learning_rate
from megatron_hybrid.training.progress import ProgressReporter

SAMPLE_PROMPT = "The "


@dataclass
class TrainingResult:
    model: HybridModel
    losses: list[float] = field(default_factory=list)  # training loss of every iteration
    val_losses: dict[int, float] = field(default_factory=dict)  # iteration -> validation loss
    tokens_per_sec: float = 0.0
    sample: str | None = None


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def language_model_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32 (nats per token)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten())


@torch.no_grad()
def evaluate(model: HybridModel, sampler: StreamSampler, iters: int, micro_batch_size: int,
             device: torch.device, autocast) -> float:
    """Mean loss over the first `iters` validation batches (a fixed set, not shuffled)."""
    model.eval()
    num_samples = min(iters * micro_batch_size, sampler.samples_per_epoch)
    total, count = 0.0, 0
    for first in range(0, num_samples, micro_batch_size):
        batch = sampler.batch(first, min(micro_batch_size, num_samples - first)).to(device)
        with autocast():
            logits = model(batch[:, :-1])
        total += float(language_model_loss(logits, batch[:, 1:])) * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count


def resume(args: argparse.Namespace, model: HybridModel, optimizer, config, progress,
           reporter: ProgressReporter) -> TrainProgress:
    """Load --load into model/optimizer/progress as the flags say; a directory without any
    checkpoint means "start from scratch" (so one command both starts and restarts a run)."""
    try:
        loaded = load_checkpoint(
            args.load, model, None if (args.finetune or args.no_load_optim) else optimizer,
            config, progress=None if args.finetune else progress, iteration=args.ckpt_step,
            verify_checksums=not args.no_verify_checksums)
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
    reporter.message(f"resumed from {args.load} at iteration {loaded.iteration} "
                     f"({loaded.consumed_train_samples} samples consumed)")
    return loaded


def run_training(args: argparse.Namespace, reporter: ProgressReporter | None = None
                 ) -> TrainingResult:
    """Train as the flags say; raises ValueError (ConfigError, PatternError, ...) for bad input
    before any training step runs."""
    check_training_args(args)
    device = pick_device(args.device)
    tokenizer = ByteTokenizer()
    config = model_config_from_args(args, tokenizer.vocab_size)
    torch.manual_seed(args.seed)
    train_tokens, valid_tokens = embedded_token_streams(tokenizer)
    train_data = StreamSampler(train_tokens, args.seq_length, args.seed)
    valid_data = StreamSampler(valid_tokens, args.seq_length, args.seed, shuffle=False)

    model = HybridModel(config, seed=args.seed).to(device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay,
                                (args.adam_beta1, args.adam_beta2), args.adam_eps)
    schedule = LRSchedule(args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters,
                          args.lr_decay_style)
    num_micro_batches = args.global_batch_size // args.micro_batch_size
    model.set_moe_aux_loss_grad_scale(1.0 / num_micro_batches)
    if args.bf16:
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    own_reporter = reporter is None
    if own_reporter:
        reporter = ProgressReporter(args.train_iters, args.log_dir,
                                    live=False if args.no_progress_bar else None)
    reporter.message(
        f"model: pattern {config.hybrid_layer_pattern!r}, {config.pattern.num_blocks} blocks / "
        f"{config.pattern.num_layers} layers, {model.num_parameters() / 1e6:.2f}M parameters; "
        f"device {device}; {args.train_iters} iterations of {args.global_batch_size} x "
        f"{args.seq_length} tokens ({num_micro_batches} micro-batches of {args.micro_batch_size})"
    )

    progress = TrainProgress(lr_schedule=dataclasses.asdict(schedule))
    if args.load:
        progress = resume(args, model, optimizer, config, progress, reporter)
    saver = None
    if args.save:
        saver = CheckpointSaver(args.save, keep_last=args.keep_last, async_save=args.async_save,
                                log=reporter.message)

    result = TrainingResult(model=model)
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
        for _ in range(num_micro_batches):
            batch = train_data.batch(consumed_samples, args.micro_batch_size).to(device)
            consumed_samples += args.micro_batch_size
            with autocast():
                logits = model(batch[:, :-1])
            loss = language_model_loss(logits, batch[:, 1:])
            (loss / num_micro_batches).backward()
            loss_sum += loss.detach()
        max_norm = args.clip_grad if args.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        model.update_expert_biases()
        pending.append(loss_sum / num_micro_batches)
        window_iters += 1
        progress.iteration, progress.consumed_train_samples = iteration, consumed_samples
        exiting = bool(args.exit_interval) and iteration % args.exit_interval == 0
        if saver is not None:
            saver.poll()
            if (args.save_interval and iteration % args.save_interval == 0) or exiting or (
                    iteration == args.train_iters):
                saver.save(iteration, model, optimizer, progress, config)

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            result.losses.extend(float(x) for x in pending)
            pending.clear()
            now = reporter.elapsed()
            tokens_per_sec = window_iters * tokens_per_iter / max(now - window_start, 1e-9)
            window_start, window_iters = now, 0
            result.tokens_per_sec = tokens_per_sec
            extra = {}
            if (aux := model.moe_aux_loss()) is not None:
                extra["moe_aux_loss"] = aux
            if device.type == "cuda":
                extra["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            reporter.log_iteration(iteration, result.losses[-1], lr, float(grad_norm),
                                   tokens_per_sec, extra)
        if args.eval_iters and (iteration % args.eval_interval == 0
                                or iteration == args.train_iters):
            val_loss = evaluate(model, valid_data, args.eval_iters, args.micro_batch_size,
                                device, autocast)
            result.val_losses[iteration] = val_loss
            reporter.log_eval(iteration, val_loss)
            window_start = reporter.elapsed()  # evaluation time is not training throughput
        if exiting:
            reporter.message(f"exiting at iteration {iteration} (--exit-interval)")
            break

    if saver is not None:
        saver.finalize()
    if args.generate_tokens:
        prompt = torch.from_numpy(tokenizer.encode(SAMPLE_PROMPT))
        new = generate(model, prompt, args.generate_tokens, args.seq_length,
                       vocab_limit=tokenizer.vocab_size, seed=args.seed)
        result.sample = SAMPLE_PROMPT + tokenizer.decode(new)
        reporter.message("sample:\n" + result.sample)
    if own_reporter:
        reporter.close()
    return result
