"""Kernels, one sub-package per op (norms/, activations/, conv1d/, ssd/, gated_delta_rule/,
rotary/, moe_experts/, mlp/, linear_cross_entropy/, sparse_attention/), each holding its eager
reference (eager.py) beside its faster implementations, and float8/ (FP8 GEMMs, a transform that
swaps linear layers); the registry (registry.py) binds one implementation per op for each
model, and cli.py reads the --kernels/--kernel flags. Nothing here imports the model side
(layers, blocks, model, training): the layers call these through the bound registry."""

if __name__ != "megatron_hybrid.kernels":  # the repository root is on sys.path
    from megatron_hybrid.shadowing import step_aside

    step_aside(__name__, __file__)
else:
    from megatron_hybrid.kernels.cli import KernelSettings, add_kernel_args, kernels_from_settings
    from megatron_hybrid.kernels.registry import (
        OPS,
        REGISTRY,
        TRANSFORMS,
        BoundKernels,
        Implementation,
        KernelChoice,
        KernelError,
        KernelRegistry,
        bind_transform,
        eager_kernels,
        resolve_kernels,
    )

    __all__ = [
        "OPS",
        "REGISTRY",
        "TRANSFORMS",
        "BoundKernels",
        "Implementation",
        "KernelChoice",
        "KernelError",
        "KernelRegistry",
        "KernelSettings",
        "add_kernel_args",
        "bind_transform",
        "eager_kernels",
        "kernels_from_settings",
        "resolve_kernels",
    ]
