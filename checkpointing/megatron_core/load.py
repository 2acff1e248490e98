"""Reading a Megatron-Core `torch_dist` checkpoint: `--load DIR` / `--finetune --load DIR` of a
Megatron-LM run, and `megatron-hybrid-convert from-megatron`.

What is carried:
- the model: every tensor found under one of its Megatron-Core spellings (keys.read_maps; split
  or packed Mamba in_proj/conv1d, TE-fused or separate norms, stacked or per-expert experts;
  multi-token-prediction depths too), whole tensors whatever tensor/pipeline layout wrote them;
- the optimizer, when its state is per parameter under the model's keys
  (`optimizer.state.exp_avg.<key>`, `...exp_avg_sq.<key>`: Megatron's non-distributed optimizer
  and the distributed optimizer's fully reshardable formats); otherwise (the distributed
  optimizer's default `dp_reshardable` buffers) it is skipped with one warning, as with
  `--no-load-optim`;
- the iteration and consumed samples, and the learning-rate schedule's settings (compared with
  this run's, as for our checkpoints).
What is not: `_extra_state` objects (TE's FP8 metadata; a delayed-scaling scale history in them
is reported), RNG states (Megatron's include CUDA RNG trackers), anything else of the common
state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_hybrid.checkpointing.errors import CheckpointError, listing
from megatron_hybrid.checkpointing.key_mapping import (
    KeyMappingError,
    PlacedKeyMap,
    parameter_keys,
    to_ours,
)
from megatron_hybrid.checkpointing.megatron_core import keys
from megatron_hybrid.checkpointing.megatron_core.args import (
    arg,
    model_config_from_args,
    model_fields_from_args,
)
from megatron_hybrid.checkpointing.megatron_core.directory import (
    COMMON_STATE_KEY,
    MegatronCheckpoint,
    object_name,
    open_checkpoint,
)
from megatron_hybrid.checkpointing.state import TrainProgress
from megatron_hybrid.config import ModelConfig

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, under `optimizer.state.{moment}.{model key}`
OPTIMIZER_PREFIX = "optimizer."
EXTRA_STATE = "._extra_state"
# TE writes these keys into `_extra_state` only for FP8 delayed scaling, the one recipe whose
# state (amax history, scales) the config cannot rebuild: Megatron-LM's own test for an
# `_extra_state` worth keeping (checkpointing.py, _fp8_extra_state_is_persistent).
FP8_HISTORY_MARKERS = (b"amax_history_fwd", b"scale_fwd", b"scale_bwd")
# Megatron-LM's args -> our LRSchedule fields (training/optimizer.py)
LR_SCHEDULE_ARGS = {
    "max_lr": ("lr",),
    "min_lr": ("min_lr",),
    "warmup_iters": ("lr_warmup_iters",),
    "decay_iters": ("lr_decay_iters", "train_iters"),
    "style": ("lr_decay_style",),
}


@dataclass
class MegatronState:
    """What a Megatron-Core checkpoint holds, in our terms."""

    directory: Path
    config: ModelConfig  # from its args (or the run's, for a checkpoint without them)
    args: object | None
    model: dict[str, torch.Tensor]  # canonical keys
    optimizer: dict | None  # {"state": {canonical key: {exp_avg, exp_avg_sq, step}}}
    iteration: int
    consumed_train_samples: int
    lr_schedule: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was not carried, one line each


def read_megatron_state(
    path: str | Path,
    iteration: int | None = None,
    run_config: ModelConfig | None = None,
    with_optimizer: bool = True,
) -> MegatronState:
    """The model (and, `with_optimizer`, the optimizer) state of the Megatron-Core checkpoint
    `path` names, in canonical keys, on CPU. Its model config comes from its saved args, or
    `run_config` when it has none. Raises CheckpointError (naming file and keys) for files that
    are missing or truncated, tensors no Megatron-Core layer of the pattern saves, and args that
    describe a model this version cannot build."""
    checkpoint = open_checkpoint(path, iteration)
    args = checkpoint.common.get("args")
    config = _config(checkpoint, args, run_config)
    model_keys = [k for k in checkpoint.tensors if not k.startswith(OPTIMIZER_PREFIX)]
    maps = keys.read_maps(config, model_keys, str(checkpoint.index_path))
    model = _converted(checkpoint, maps, config, "")
    state = MegatronState(
        directory=checkpoint.directory,
        config=config,
        args=args,
        model=model,
        optimizer=None,
        iteration=int(checkpoint.common.get("iteration", 0) or 0),
        consumed_train_samples=int(arg(args, "consumed_train_samples", default=0) or 0),
        lr_schedule=_lr_schedule(args),
    )
    if with_optimizer:
        state.optimizer = _optimizer_state(checkpoint, maps, config, state)
    state.notes += _not_carried(checkpoint)
    return state


def read_megatron_model_fields(path: str | Path, iteration: int | None = None) -> dict:
    """The ModelConfig fields a Megatron-Core checkpoint's saved args hold (no tensor is read):
    what `--use-checkpoint-args` takes from it. CheckpointError without saved args."""
    checkpoint = open_checkpoint(path, iteration)
    args = checkpoint.common.get("args")
    if args is None:
        raise CheckpointError(
            f"{checkpoint.directory} has no saved Megatron-LM args (common state key 'args'): "
            "give the model flags instead of --use-checkpoint-args"
        )
    return model_fields_from_args(args, str(checkpoint.directory))


def _config(checkpoint: MegatronCheckpoint, args, run_config: ModelConfig | None) -> ModelConfig:
    if args is None:
        if run_config is None:
            raise CheckpointError(
                f"{checkpoint.directory} has no saved Megatron-LM args (common state key "
                "'args') to take the model config from; load it with --load and the model flags"
            )
        return run_config
    embedding = checkpoint.tensors.get("embedding.word_embeddings.weight")
    vocab = embedding.size[0] if embedding is not None else arg(args, "padded_vocab_size")
    return model_config_from_args(args, vocab, str(checkpoint.directory))


def _converted(
    checkpoint: MegatronCheckpoint, maps: list[PlacedKeyMap], config: ModelConfig, prefix: str
) -> dict[str, torch.Tensor]:
    """Our tensors from the checkpoint's, through `maps` (their keys under `prefix`)."""
    prefixed = [dataclasses.replace(m, theirs=tuple(prefix + k for k in m.theirs)) for m in maps]
    tensors = checkpoint.read_tensors([k for m in prefixed for k in m.theirs])
    try:
        return to_ours(tensors, prefixed, config)
    except KeyMappingError as error:
        raise CheckpointError(f"{checkpoint.index_path}: {error}") from None


def _optimizer_state(
    checkpoint: MegatronCheckpoint, maps: list[PlacedKeyMap], config: ModelConfig, state
) -> dict | None:
    """Adam's moments of every parameter under the model's keys, with the common step; None
    (and a note) when the checkpoint's optimizer state is laid out otherwise, or absent."""
    parameters = parameter_keys(config)
    moment_maps = [m for m in maps if m.ours[0] in parameters]
    wanted = [
        f"{OPTIMIZER_PREFIX}state.{moment}.{key}"
        for m in moment_maps
        for key in m.theirs
        for moment in MOMENTS
    ]
    found = [k for k in checkpoint.tensors if k.startswith(OPTIMIZER_PREFIX)]
    absent = [k for k in wanted if k not in checkpoint.tensors]
    if not found and not any(o.startswith(OPTIMIZER_PREFIX) for o in checkpoint.objects):
        state.notes.append(
            f"{checkpoint.directory} holds no optimizer state: the optimizer starts fresh "
            "(as with --no-load-optim)"
        )
        return None
    if absent:
        example = found[0] if found else next(o for o in checkpoint.objects if "optimizer" in o)
        state.notes.append(
            f"optimizer state not loaded: it is not Adam's moments per parameter under the "
            f"model's keys ({len(absent)} missing, e.g. {absent[0]}; the checkpoint has e.g. "
            f"{example}, as Megatron-LM's distributed optimizer saves without "
            "--dist-ckpt-optim-fully-reshardable); the optimizer starts fresh (as with "
            "--no-load-optim)"
        )
        return None
    step = torch.tensor(float(_common_step(checkpoint.common, state.iteration)))
    moments = {
        moment: _converted(checkpoint, moment_maps, config, f"{OPTIMIZER_PREFIX}state.{moment}.")
        for moment in MOMENTS
    }
    return {
        "state": {
            m.ours[0]: {
                "step": step.clone(),
                **{moment: moments[moment][m.ours[0]] for moment in MOMENTS},
            }
            for m in moment_maps
        },
        "param_groups": [],  # the run's own hyper-parameters (checkpointing/parts.py)
    }


def _common_step(common: dict, iteration: int) -> int:
    """Megatron's optimizers save one step for all parameters (`common_step`, under
    `optimizer.state`, or `optimizer.optimizer.state` for mixed precision); without one, the
    iteration (one optimizer step per iteration)."""
    optimizer = common.get("optimizer")
    holders = [optimizer]
    if isinstance(optimizer, dict):
        holders.append(optimizer.get("optimizer"))
    for holder in holders:
        state = holder.get("state") if isinstance(holder, dict) else None
        step = state.get("common_step") if isinstance(state, dict) else None
        if step is not None:
            return int(step.item() if isinstance(step, torch.Tensor) else step)
    return iteration


def _lr_schedule(args) -> dict:
    """The run's schedule settings in our LRSchedule's fields, every field present (None where
    the args have no value: a schedule counted in samples), as our checkpoints record it."""
    if args is None:
        return {}
    return {name: arg(args, *arg_names) for name, arg_names in LR_SCHEDULE_ARGS.items()}


def _not_carried(checkpoint: MegatronCheckpoint) -> list[str]:
    """One line per kind of object of the checkpoint that a load leaves behind."""
    notes = []
    extra = [k for k in checkpoint.objects if object_name(k).endswith(EXTRA_STATE)]
    with_history = [
        object_name(k)[: -len(EXTRA_STATE)]
        for k, data in checkpoint.read_objects(extra).items()
        if any(marker in data for marker in FP8_HISTORY_MARKERS)
    ]
    if with_history:
        notes.append(
            f"FP8 delayed-scaling state (amax history and scales, in _extra_state) of "
            f"{len(with_history)} module(s) is not carried, e.g. {listing(with_history, 3)}: "
            "training here is not FP8"
        )
    others = sorted(
        {
            object_name(k)
            for k in checkpoint.objects
            if k != COMMON_STATE_KEY
            and not object_name(k).endswith(EXTRA_STATE)
            and not k.startswith(OPTIMIZER_PREFIX)
        }
    )
    if others:
        notes.append(
            f"not carried: {', '.join(others)} (RNG states and run bookkeeping of Megatron-LM)"
        )
    return notes


def load_megatron_checkpoint(
    path: str | Path,
    model,
    optimizer,
    config: ModelConfig,
    progress: TrainProgress | None = None,
    iteration: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainProgress | None:
    """`load_checkpoint` for a Megatron-Core checkpoint: into `model` (a model or a rank's
    pipeline stages) and, when given, `optimizer` (if its state maps; else a warning) and
    `progress`. The checkpoint's config differing from `config` is a warning (as for ours),
    tensors that do not fit are a CheckpointMismatchError before anything is touched."""
    state = read_megatron_state(path, iteration, config, with_optimizer=optimizer is not None)
    return load_state_into(state, model, optimizer, config, progress, log)


def load_state_into(
    state: MegatronState,
    model,
    optimizer,
    config: ModelConfig,
    progress: TrainProgress | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainProgress | None:
    """Put a read Megatron-Core checkpoint into `model`, `optimizer` and `progress` (see
    `load_megatron_checkpoint`)."""
    from megatron_hybrid.checkpointing.manager import (
        check_shapes_fit,
        checkpoint_state,
        config_differences,
    )

    say = log or (lambda _: None)
    differences = config_differences(state.config.to_dict(), config)
    parts = checkpoint_state(model, optimizer if state.optimizer else None, None, config)
    shapes = {f"model.{k}": tuple(t.shape) for k, t in state.model.items()}
    if state.optimizer:
        shapes.update(_tensor_shapes(state.optimizer["state"], "optimizer.state"))
    check_shapes_fit(shapes, parts, state.directory, differences)
    if differences:  # only now known to be harmless
        say(
            f"warning: {state.directory} was saved with another model config; loading anyway "
            "(tensor shapes match):\n  " + "\n  ".join(differences)
        )
    for note in state.notes:
        say(f"warning: {note}")
    like = parts["model"].state_dict()
    parts["model"].load_state_dict({k: v.to(like[k].dtype) for k, v in state.model.items()})
    if state.optimizer:
        parts["optimizer"].load_state_dict(state.optimizer)
    if progress is None:
        return None
    progress.iteration = state.iteration
    progress.consumed_train_samples = state.consumed_train_samples
    progress.saved_lr_schedule = dict(state.lr_schedule)
    progress.saved_rng = None  # Megatron's RNG states are not carried
    return progress


def _tensor_shapes(state: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_tensor_shapes(value, f"{prefix}.{key}"))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}.{key}"] = tuple(value.shape)
    return out


def save_as_ours(
    state: MegatronState, save_dir: str | Path, log: Callable[[str], None] = print
) -> Path:
    """`from-megatron`: write a read Megatron-Core checkpoint as a checkpoint of ours at its
    iteration: the model, the optimizer when its state maps (an AdamW with the run's saved
    weight decay, betas and eps; the learning rate follows the resuming run's schedule), and
    the progress, so `--load SAVE_DIR` resumes where the Megatron-LM run stopped."""
    from megatron_hybrid.checkpointing.files import iteration_dir_name
    from megatron_hybrid.checkpointing.manager import CheckpointSaver
    from megatron_hybrid.model import HybridModel
    from megatron_hybrid.training.optimizer import build_optimizer

    config = state.config
    with torch.device("meta"):
        model = HybridModel(config)
    model.to_empty(device="cpu")
    optimizer = None
    if state.optimizer is not None:
        betas = (
            arg(state.args, "adam_beta1", default=0.9),
            arg(state.args, "adam_beta2", default=0.999),
        )
        optimizer = build_optimizer(
            model,
            lr=float(arg(state.args, "lr", default=0.0) or 0.0),
            weight_decay=float(arg(state.args, "weight_decay", default=0.01)),
            betas=tuple(map(float, betas)),
            eps=float(arg(state.args, "adam_eps", default=1e-8)),
        )
    progress = TrainProgress(lr_schedule=dict(state.lr_schedule))
    load_state_into(state, model, optimizer, config, progress, log)
    CheckpointSaver(save_dir, log=log).save(state.iteration, model, optimizer, progress, config)
    return Path(save_dir) / iteration_dir_name(state.iteration)
