"""`Stateful` wrappers (the "hooks") that present the model, optimizer and training progress to
torch.distributed.checkpoint under canonical keys.

The model's own module names (physical blocks, fused groups, wrapper prefixes) never reach the
files: `ModelState` and `OptimizerState` rename to canonical keys on the way out and back on the
way in, so any fusion of the same canonical layers loads any other's checkpoint.

Nor does the model's tensor-parallel storage order: packed weights that tensor parallelism keeps
rank-major (Mamba2's in_proj and conv1d, SwiGLU's fc1; megatron_hybrid/parallel/packed.py) are
presented to DCP in the canonical row order, as sharded tensors at canonical offsets, and so are
their optimizer moments (checkpointing/packed_views.py). A checkpoint therefore loads into any
tensor/data-parallel layout; a packed tensor missing from the state dict is an error.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, distribute_tensor

from megatron_hybrid.canonical import canonical_key, physical_name
from megatron_hybrid.checkpointing.packed_views import (
    frozen_names,
    is_moment,
    packed_views,
    to_canonical,
    to_rank_major,
)
from megatron_hybrid.pattern import HybridPattern


def as_laid_out_like(value, like):
    """A whole (global) tensor `value` as the shard `like` (a DTensor) holds, every rank cutting
    its own piece; anything else as it is (already a shard, or `like` is not sharded)."""
    if isinstance(like, DTensor) and isinstance(value, torch.Tensor):
        if not isinstance(value, DTensor):
            return distribute_tensor(
                value.to(like.device), like.device_mesh, like.placements, src_data_rank=None
            )
    return value


def _shaped_like(value, like) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and isinstance(like, torch.Tensor)
        and tuple(value.shape) == tuple(like.shape)
    )


def holds_nothing(model: torch.nn.Module) -> bool:
    """An empty middle pipeline stage ("M||M"): no parameter, no buffer, nothing to save (torch's
    state-dict helpers refuse an empty model)."""
    return not model.state_dict()


class ModelState(Stateful):
    """The model's parameters and persistent buffers as {canonical key: tensor}.

    torch's `get/set_model_state_dict` strip wrapper prefixes (activation checkpointing,
    torch.compile) and keep FSDP2/DTensor shards as DTensors, so each rank saves its own shard."""

    def __init__(self, model: torch.nn.Module, pattern: HybridPattern):
        self.model, self.pattern = model, pattern

    def state_dict(self) -> dict[str, torch.Tensor]:
        if holds_nothing(self.model):
            return {}
        state = get_model_state_dict(self.model)
        packed = packed_views(self.model, state, "the model state dict")
        return {
            canonical_key(name, self.pattern): to_canonical(tensor, packed[name])
            if name in packed
            else tensor
            for name, tensor in state.items()
        }

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load canonical tensors: as DCP fills them (this rank's shards) or whole tensors,
        which a sharded model cuts into its shards."""
        if holds_nothing(self.model):
            return
        physical = {physical_name(key, self.pattern): t for key, t in state_dict.items()}
        current = get_model_state_dict(self.model)
        packed = packed_views(self.model, current, "the model state dict")
        for name, value in physical.items():
            like = current.get(name)
            if name in packed:
                value = to_rank_major(value, like, packed[name])
            physical[name] = as_laid_out_like(value, like)
        set_model_state_dict(self.model, physical, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    """Optimizer state (moments, step counts, hyper-parameters) keyed by canonical parameter key.

    Uses torch's `get/set_optimizer_state_dict`, which key state by parameter name (and handle
    FSDP2 / DTensor sharding); this wrapper renames those names to canonical keys."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, pattern: HybridPattern
    ):
        self.model, self.optimizer, self.pattern = model, optimizer, pattern

    def state_dict(self) -> dict:
        if holds_nothing(self.model):
            return {"state": {}, "param_groups": self.optimizer.state_dict()["param_groups"]}
        state = get_optimizer_state_dict(self.model, self.optimizer)
        rename = self._rename(canonical_key)
        packed = self._packed_views(state)
        for name in packed.keys() & state["state"].keys():
            state["state"][name] = {
                k: to_canonical(v, packed[name]) if is_moment(v, packed[name]) else v
                for k, v in state["state"][name].items()
            }
        return {
            "state": {rename(name): value for name, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [rename(p) for p in group["params"]]}
                for group in state["param_groups"]
            ],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if holds_nothing(self.model):
            return
        rename = self._rename(physical_name)
        state = {
            "state": {rename(key): value for key, value in state_dict["state"].items()},
            "param_groups": [
                {**group, "params": [rename(p) for p in group["params"]]}
                for group in state_dict["param_groups"]
            ],
        }
        packed = self._packed_views(state)
        params = get_model_state_dict(self.model)
        for name, values in state["state"].items():
            like = params.get(name)
            if name in packed:
                values = {
                    k: to_rank_major(v, like, packed[name]) if is_moment(v, packed[name]) else v
                    for k, v in values.items()
                }
            # Moments loaded whole (a Megatron-Core checkpoint) take their parameter's layout.
            state["state"][name] = {
                k: as_laid_out_like(v, like) if _shaped_like(v, like) else v
                for k, v in values.items()
            }
        set_optimizer_state_dict(self.model, self.optimizer, state)

    def _rename(self, mapping):
        return lambda name: mapping(name, self.pattern)

    def _packed_views(self, state: dict) -> dict:
        """The packed tensors of the model, each checked to be named in the optimizer state
        dict `state` (every parameter the optimizer holds is named in its param groups; frozen
        parameters are not held, and have no moments to view)."""
        held = {name for group in state["param_groups"] for name in group["params"]}
        return packed_views(self.model, held | frozen_names(self.model), "the optimizer state dict")


@dataclass
class TrainProgress(Stateful):
    """Where training stands: iteration, samples consumed, RNG streams, schedule settings.

    `lr_schedule` holds this run's learning-rate schedule settings, which its saves record. A
    load keeps them and puts the checkpoint's values of the same settings in
    `saved_lr_schedule`, so the two can be compared."""

    iteration: int = 0
    consumed_train_samples: int = 0
    lr_schedule: dict = field(default_factory=dict)
    saved_lr_schedule: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "iteration": self.iteration,
            "consumed_train_samples": self.consumed_train_samples,
            "lr_schedule": dict(self.lr_schedule),
            # One opaque blob, not tensors: RNG states differ between machines (CUDA devices)
            # and are no part of the tensor-fit check a load runs.
            "rng": pickle.dumps(rng),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.iteration = int(state_dict["iteration"])
        self.consumed_train_samples = int(state_dict["consumed_train_samples"])
        self.saved_lr_schedule = dict(state_dict.get("lr_schedule", {}))
        blob = state_dict.get("rng")
        self.saved_rng = pickle.loads(blob) if isinstance(blob, bytes) else None

    def restore_rng(self) -> None:
        """Put the RNG streams back as they were at save time (call after loading). CUDA
        streams come back only on a machine with as many CUDA devices as the saving one."""
        rng = getattr(self, "saved_rng", None)
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        cuda = rng.get("cuda")
        if (
            cuda is not None
            and torch.cuda.is_available()
            and len(cuda) == torch.cuda.device_count()
        ):
            torch.cuda.set_rng_state_all(cuda)
