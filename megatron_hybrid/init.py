"""Parameter initialization as a pure function of (seed, canonical key, shape).

Every tensor draws from its own generator seeded by a hash of the seed and its canonical key,
so a fused and an unfused model of the same canonical layers, or a model split over any
tensor/pipeline/data-parallel layout, start from identical weights, whatever order or device
the modules are built in.

Which rule a tensor gets (Megatron-LM / Mamba2 defaults, megatron_hybrid/specs/init_rules.py):
    outside the decoder layers        MODEL_RULES below
    an MTP depth's own tensors        DEPTH_RULES in megatron_hybrid/mtp.py (enorm, eh_proj, ...)
    a sub-layer's pre-norm            ones (in the decoder and in every MTP depth)
    a tensor of a mixer               its symbol's spec, by the tensor's name inside the mixer
                                      (`MixerSpec.init_rules`), e.g. Mamba2's A_log, dt_bias
A mixer tensor without a rule in its own spec is an error: two symbols never share a rule by a
coincidence of names.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from megatron_hybrid.canonical import canonical_key, locate, mtp_depth_tensor
from megatron_hybrid.config import ModelConfig
from megatron_hybrid.mtp import DEPTH_RULES
from megatron_hybrid.specs.base import InitRule
from megatron_hybrid.specs.init_rules import normal, ones

MODEL_RULES: dict[str, InitRule] = {
    "embedding.word_embeddings.weight": normal,
    "decoder.final_norm.weight": ones,
    "output_layer.weight": normal,
}
NORM_RULES: dict[str, InitRule] = {"weight": ones}  # every sub-layer's pre-norm (RMSNorm)


class MissingInitRuleError(KeyError):
    """A tensor no initialization rule covers."""

    def __str__(self) -> str:
        return str(self.args[0])


def tensor_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def init_rule(key: str, config: ModelConfig) -> InitRule:
    """The rule for the tensor under canonical `key`; MissingInitRuleError if none covers it."""
    tensor = locate(key, config.pattern)
    depth_tensor = mtp_depth_tensor(key)
    if depth_tensor is not None:
        rules, name, where = DEPTH_RULES, depth_tensor[1], "DEPTH_RULES in megatron_hybrid/mtp.py"
    elif tensor is None:
        rules, name, where = MODEL_RULES, key, "MODEL_RULES in megatron_hybrid/init.py"
    elif tensor.part == "norm":
        rules, name, where = NORM_RULES, tensor.name, "NORM_RULES in megatron_hybrid/init.py"
    else:
        rules, name = tensor.spec.init_rules, tensor.name
        where = f"the init_rules of the {tensor.symbol!r} ({tensor.spec.name}) spec"
    rule = rules.get(name)
    if rule is None:
        raise MissingInitRuleError(f"no initialization rule for {key!r}: add {name!r} to {where}")
    return rule


def initial_value(key: str, shape: tuple[int, ...], seed: int, config: ModelConfig) -> torch.Tensor:
    """The float32 CPU value the tensor under canonical `key` starts from."""
    return init_rule(key, config)(shape, tensor_generator(seed, key), config)


@torch.no_grad()
def initialize_parameters(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Overwrite every parameter and persistent buffer of `model` with its initial value."""
    persistent = dict(model.state_dict(keep_vars=True))
    for name, tensor in persistent.items():
        key = canonical_key(name, config.pattern)
        tensor.copy_(initial_value(key, tuple(tensor.shape), seed, config))
