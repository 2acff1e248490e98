"""A rank's model *parts* (its pipeline stages; one part without pipelining) presented to DCP as
one canonical state.

Each part is checkpointed by the per-model hooks of state.py; this module merges their
canonical keys (disjoint: each stage holds other blocks) and splits them back on load. Optimizer
`param_groups` are saved as hyper-parameters only (no parameter lists): which parameters a group
holds depends on the layout (a pipeline rank holds some of them), the hyper-parameters do not,
and on load each part's groups get the saved hyper-parameters and keep their own parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.stateful import Stateful

from megatron_hybrid.checkpointing.state import ModelState, OptimizerState
from megatron_hybrid.pattern import HybridPattern


class OptimizerParts:
    """One optimizer per model part behaving as one for the training loop (`step`,
    `zero_grad`, `param_groups` for the learning rate)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def as_parts(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def as_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return optimizer.optimizers if isinstance(optimizer, OptimizerParts) else [optimizer]


class ModelPartsState(Stateful):
    def __init__(self, parts: Sequence[torch.nn.Module], pattern: HybridPattern):
        self.states = [ModelState(part, pattern) for part in parts]
        self._keys: list[list[str]] = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        merged: dict[str, torch.Tensor] = {}
        self._keys = []
        for state in self.states:
            part = state.state_dict()
            self._keys.append(list(part))
            merged.update(part)
        return merged

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if not self._keys:
            self.state_dict()
        for state, keys in zip(self.states, self._keys, strict=True):
            state.load_state_dict({key: state_dict[key] for key in keys})


class OptimizerPartsState(Stateful):
    def __init__(self, parts: Sequence[torch.nn.Module], optimizers, pattern: HybridPattern):
        optimizers = as_optimizers(optimizers)
        if len(optimizers) != len(parts):
            raise ValueError(f"{len(parts)} model parts but {len(optimizers)} optimizers")
        self.states = [
            OptimizerState(part, opt, pattern) for part, opt in zip(parts, optimizers, strict=True)
        ]
        self._keys: list[list[str]] = []

    def state_dict(self) -> dict:
        merged_state: dict = {}
        groups: list[dict] = []
        self._keys = []
        for state in self.states:
            part = state.state_dict()
            self._keys.append(list(part["state"]))
            merged_state.update(part["state"])
            groups = groups or [
                {k: v for k, v in group.items() if k != "params"} for group in part["param_groups"]
            ]
        return {"state": merged_state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._keys:
            self.state_dict()
        saved_groups = state_dict.get("param_groups", [])
        for state, keys in zip(self.states, self._keys, strict=True):
            current = state.state_dict()["param_groups"]
            if len(saved_groups) == len(current):
                groups = [
                    {**{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]}
                    for saved, group in zip(saved_groups, current, strict=True)
                ]
            else:  # another grouping: keep this run's hyper-parameters
                groups = current
            state.load_state_dict(
                {"state": {key: state_dict["state"][key] for key in keys}, "param_groups": groups}
            )
