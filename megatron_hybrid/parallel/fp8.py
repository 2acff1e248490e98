"""`--fp8-format`: the dense GEMMs of the pattern's blocks in FP8 (torchao's float8 training,
megatron_hybrid/kernels/float8/), the first step of `parallelize`: torchao converts the linear
layers before torch.compile and FSDP wrap them.

Which GEMMs, the one rule (`fp8_linear_eligible`): every `nn.Linear` inside the pattern's blocks
(the decoder's and the MTP depths') whose in and out features are both multiples of 16, which FP8
GEMMs need: MLP (shared experts included) fc1/fc2, attention qkv/proj, Mamba2 and Gated DeltaNet
in_proj/out_proj, MLA's and DSA's projections, MoE latent projections. Everything else keeps its
precision (bf16 under --bf16):

- outside the blocks: the embedding, the output layer, MTP's eh_proj;
- the MoE router (a weight parameter, not an nn.Linear: its scores pick the experts) and the
  routed experts (grouped weights run by the `moe.experts` op; torchao swaps nn.Linear only);
- a linear layer with a dimension that is not a multiple of 16 (logged by name at start-up).

The weights stay high-precision parameters under their own names, so checkpoints hold no FP8 and
load into runs with or without it. Tensor parallelism is refused (`fp8_flag_problem`): its layers
hold packed DTensor weights that torchao's float8 tensor-parallel styles do not cover.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from megatron_hybrid.kernels.float8 import FP8_DIM_MULTIPLE, fp8_choice_problem
from megatron_hybrid.kernels.registry import KernelError, bind_transform
from megatron_hybrid.model import HybridModel

FP8_BACKEND = "torchao"

# The transform the registry binds: (module, fp8_format, fp8_recipe, module_filter) -> names.
ConvertLinears = Callable[[nn.Module, str, str, Callable[[nn.Module, str], bool]], list[str]]


def fp8_linear_eligible(module: nn.Module, name: str = "") -> bool:
    """Whether a module of a pattern block runs its GEMM in FP8: an nn.Linear whose in and out
    features are multiples of FP8_DIM_MULTIPLE (the module docstring's rule)."""
    return isinstance(module, nn.Linear) and all(
        size % FP8_DIM_MULTIPLE == 0 for size in module.weight.shape
    )


def fp8_flag_problem(
    fp8_format: str | None,
    fp8_recipe: str,
    tensor_model_parallel_size: int,
    tokens_per_micro_batch: int,
    kernel_requests: dict[str, str],
    bf16: bool,
) -> str | None:
    """Why the FP8 flags do not fit the others (checked before any work), or None."""
    if fp8_format is None:
        return None
    problem = fp8_choice_problem(fp8_format, fp8_recipe)
    if problem is not None:
        return problem
    if fp8_recipe == "rowwise" and not bf16:
        return (
            "--fp8-recipe rowwise needs --bf16: torch's rowwise-scaled FP8 GEMM writes bf16 "
            "outputs (float32 ones only through cuBLAS on compute capability 9.0)"
        )
    problem = fp8_tensor_parallel_problem(fp8_format, tensor_model_parallel_size)
    if problem is not None:
        return problem
    if tokens_per_micro_batch % FP8_DIM_MULTIPLE:
        return (
            f"--fp8-format {fp8_format}: --micro-batch-size x --seq-length = "
            f"{tokens_per_micro_batch} tokens must be a multiple of {FP8_DIM_MULTIPLE} (the "
            "weight-gradient GEMM runs in FP8 over the tokens)"
        )
    if kernel_requests.get("mlp") == "tiled":
        return (
            f"--fp8-format {fp8_format} with --kernel mlp=tiled: the tiled MLP reads the "
            "layers' weights and runs its own bf16 GEMMs, bypassing FP8; use one of the two"
        )
    return None


def fp8_tensor_parallel_problem(fp8_format: str, tensor_model_parallel_size: int) -> str | None:
    """Why FP8 cannot run with this tensor-parallel size, or None."""
    if tensor_model_parallel_size == 1:
        return None
    return (
        f"--fp8-format {fp8_format} with --tensor-model-parallel-size "
        f"{tensor_model_parallel_size} is not supported: tensor-parallel layers hold packed "
        "DTensor weights that torchao's float8 tensor-parallel styles do not cover; FP8 runs "
        "with data (FSDP), pipeline and expert parallelism"
    )


def bind_fp8(fp8_format: str, device: torch.device | str) -> ConvertLinears:
    """The FP8 conversion for a model on `device`.

    Raises:
        KernelError: FP8 cannot run there (not CUDA, compute capability below 8.9, torchao
            missing), prefixed with the flag.
    """
    try:
        return bind_transform("float8_training", FP8_BACKEND, device)
    except KernelError as error:
        raise KernelError(
            f"--fp8-format {fp8_format}: {error} (FP8 GEMMs need a CUDA GPU of compute "
            "capability 8.9 or more and torchao; drop the flag to train without FP8)"
        ) from error


def convert_blocks_to_fp8(
    part: HybridModel, fp8_format: str, fp8_recipe: str, convert: ConvertLinears
) -> tuple[list[str], list[str]]:
    """Convert the eligible linear layers of `part`'s blocks with `convert` (the bound
    transform); return (converted, left in high precision) linear names, relative to `part`."""
    converted, skipped = [], []
    for stack_name, stack in _named_block_stacks(part):
        for index, block in stack.layers.items():
            prefix = f"{stack_name}.layers.{index}."
            names = convert(block, fp8_format, fp8_recipe, fp8_linear_eligible)
            converted += [prefix + name for name in names]
            skipped += [
                prefix + name
                for name, module in block.named_modules()
                if isinstance(module, nn.Linear) and name not in names
            ]
    return converted, skipped


def apply_fp8(part: HybridModel, fp8_format: str, fp8_recipe: str, log=print) -> list[str]:
    """Run the eligible GEMMs of `part`'s blocks in FP8 (in place); return the converted linear
    layers' names. Raises KernelError where FP8 cannot run (see `bind_fp8`)."""
    parameters = [p for stack in part.block_stacks() for p in stack.layers.parameters()]
    if not parameters:  # an empty pipeline stage
        return []
    convert = bind_fp8(fp8_format, parameters[0].device)
    converted, skipped = convert_blocks_to_fp8(part, fp8_format, fp8_recipe, convert)
    kept = f"; kept in high precision (a dimension not a multiple of {FP8_DIM_MULTIPLE}): "
    log(
        f"FP8 ({fp8_format}, {fp8_recipe}, {FP8_BACKEND}): {len(converted)} linear layers in the "
        "blocks; embedding, output layer, routers and routed experts keep their precision"
        + (kept + ", ".join(_roles(skipped)) if skipped else "")
    )
    return converted


def _named_block_stacks(part: HybridModel) -> list[tuple[str, nn.Module]]:
    stacks = {id(stack) for stack in part.block_stacks()}
    return [(name, module) for name, module in part.named_modules() if id(module) in stacks]


def _roles(names: list[str]) -> list[str]:
    """Linear names without their block index, each once ("decoder.layers.*.sequence_mixer...")."""
    return list(dict.fromkeys(re.sub(r"\.layers\.\d+\.", ".layers.*.", name) for name in names))
