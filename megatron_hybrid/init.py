"""Parameter initialization as a pure function of (seed, canonical key, shape).

Every tensor draws from its own generator seeded by a hash of the seed and its canonical key,
so a fused and an unfused model of the same canonical layers, or a model split over any
tensor/pipeline/data-parallel layout, start from identical weights, whatever order or device
the modules are built in.

Rules (Megatron-LM / Mamba2 defaults):
    *norm.weight, mixer.D             ones
    mixer.A_log                       log(U(1, 16))
    mixer.dt_bias                     softplus^-1(dt), dt log-uniform in [dt_min, dt_max], floored
    mixer.conv1d.{weight,bias}        U(-1/sqrt(K), 1/sqrt(K))   (nn.Conv1d default, fan-in K)
    router.expert_bias                zeros
    linear_proj, out_proj, linear_fc2 N(0, std / sqrt(2 * num_layers))  (output projections)
    everything else                   N(0, std)
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from megatron_hybrid.checkpointing.canonical import canonical_key
from megatron_hybrid.config import ModelConfig

_OUTPUT_PROJECTIONS = ("linear_proj.weight", "out_proj.weight", "linear_fc2.weight")


def tensor_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def initial_value(key: str, shape: tuple[int, ...], seed: int, config: ModelConfig) -> torch.Tensor:
    """The float32 CPU value the tensor under canonical `key` starts from."""
    gen = tensor_generator(seed, key)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("norm.weight") or key.endswith("mixer.D"):
        return torch.ones(shape)
    if key.endswith("router.expert_bias"):
        return torch.zeros(shape)
    if leaf == "A_log":
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if leaf == "dt_bias":
        lo, hi = math.log(config.mamba_dt_min), math.log(config.mamba_dt_max)
        dt = torch.empty(shape).uniform_(lo, hi, generator=gen).exp()
        dt = dt.clamp(min=config.mamba_dt_init_floor)
        return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    if ".conv1d." in key:
        bound = 1.0 / math.sqrt(config.mamba_conv_kernel)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    std = config.init_method_std
    if key.endswith(_OUTPUT_PROJECTIONS):
        std = std / math.sqrt(2.0 * config.pattern.num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def initialize_parameters(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Overwrite every parameter and persistent buffer of `model` with its initial value."""
    persistent = dict(model.state_dict(keep_vars=True))
    for name, tensor in persistent.items():
        key = canonical_key(name, config.pattern)
        tensor.copy_(initial_value(key, tuple(tensor.shape), seed, config))
