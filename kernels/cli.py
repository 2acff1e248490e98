"""Command-line flags for the kernel registry: `--kernels auto|eager`, `--kernel OP=IMPL`, and
the options of implementations that take some (`--tiled-mlp-shards N` for `--kernel mlp=tiled`).

    add_kernel_args(parser)      # the flags (training/arguments.py maps them to KernelSettings)
    kernels = kernels_from_settings(KernelSettings(kernels="auto"), device)  # or KernelError
    print(kernels.describe())    # the start-up line
    model = HybridModel(config, seed, kernels=kernels)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from megatron_hybrid.kernels.registry import (
    MODES,
    OPS,
    BoundKernels,
    KernelError,
    resolve_kernels,
)


@dataclass
class KernelSettings:
    """Which implementation runs each op of a model (the "kernels" flags)."""

    kernels: str = "auto"
    """Mode, one of MODES: auto (per op the fastest the device supports: Triton on CUDA, the
    eager reference on CPU), or eager everywhere."""
    kernel: list[str] = field(default_factory=list)
    """Requests "OP=IMPL" that override the mode for one op each (an impossible one is an
    error, never a silent fallback)."""
    tiled_mlp_shards: int = 4
    """Token shards of `mlp=tiled` (its option `shards`)."""


def add_kernel_args(parser: argparse.ArgumentParser) -> None:
    """Add `--kernels`, `--kernel` and `--tiled-mlp-shards` to `parser` (in an argument group
    of their own; defaults from KernelSettings)."""
    defaults = KernelSettings()
    group = parser.add_argument_group("kernels")
    group.add_argument(
        "--kernels",
        choices=MODES,
        default=defaults.kernels,
        help="auto: per op the fastest implementation the device supports (Triton on CUDA; on "
        "CPU plain PyTorch), logged at start-up; eager: plain PyTorch for every op "
        "(default: auto)",
    )
    group.add_argument(
        "--kernel",
        action="append",
        default=defaults.kernel,
        metavar="OP=IMPL",
        help="use implementation IMPL for op OP, or stop with an error saying why it cannot "
        f"run; repeatable. Ops: {', '.join(OPS)}; implementations: eager, triton, fla "
        "(gated_delta_rule only), tiled (mlp only)",
    )
    group.add_argument(
        "--tiled-mlp-shards",
        type=_positive_int,
        default=defaults.tiled_mlp_shards,
        metavar="N",
        help="with --kernel mlp=tiled: split the tokens into N shards; each shard's MLP hidden "
        "activations exist only while it is computed, in forward and again in backward "
        "(default: 4)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_kernel_requests(items: list[str]) -> dict[str, str]:
    """`["rms_norm=triton", ...]` -> `{"rms_norm": "triton"}`.

    Raises:
        KernelError: an item without exactly one '=', an empty side, or one op given twice
            with different implementations.
    """
    requests: dict[str, str] = {}
    for item in items:
        op, sep, impl = item.partition("=")
        op, impl = op.strip(), impl.strip()
        if not sep or not op or not impl or "=" in impl:
            raise KernelError(
                f"--kernel {item!r}: expected OP=IMPL, e.g. rms_norm=triton; ops: {', '.join(OPS)}"
            )
        if requests.get(op, impl) != impl:
            raise KernelError(
                f"--kernel: op {op!r} requested as both {requests[op]!r} and {impl!r}"
            )
        requests[op] = impl
    return requests


def kernels_from_settings(settings: KernelSettings, device: torch.device | str) -> BoundKernels:
    """Bind the kernels that `settings` ask for, for a model on `device`.

    Raises:
        KernelError: a malformed or impossible request (see `resolve_kernels`).
    """
    options = {"mlp=tiled": {"shards": settings.tiled_mlp_shards}}
    return resolve_kernels(
        parse_kernel_requests(settings.kernel), settings.kernels, device, options=options
    )
