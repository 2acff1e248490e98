"""FP8 GEMMs through torchao's float8 training: `nn.Linear` layers are swapped in place for
`torchao.float8.Float8Linear`, which keeps the high-precision weight as its parameter (same
name, dtype and values: checkpoints never see FP8) and casts input, weight and output gradient
to FP8 with dynamic scales inside each GEMM.

The `float8_training` transform of the registry (kernels/registry.py) binds
`convert_to_float8_training`; importing this module imports torchao.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn
from torchao.float8 import Float8LinearConfig
from torchao.float8 import convert_to_float8_training as torchao_convert
from torchao.float8.config import e4m3_dtype, e5m2_dtype
from torchao.float8.float8_linear import Float8Linear

from megatron_hybrid.kernels.float8 import fp8_choice_problem


def float8_linear_config(
    fp8_format: str, fp8_recipe: str, emulate: bool = False
) -> Float8LinearConfig:
    """torchao's config for Megatron's `fp8_format` ("e4m3": every FP8 tensor e4m3; "hybrid":
    e4m3 input and weight, e5m2 output gradient) under torchao recipe `fp8_recipe`.
    `emulate` runs the GEMMs in high precision on FP8-rounded operands (tests on CPU).

    Raises:
        ValueError: a combination `fp8_choice_problem` refuses.
    """
    problem = fp8_choice_problem(fp8_format, fp8_recipe)
    if problem is not None:
        raise ValueError(problem)
    config = Float8LinearConfig.from_recipe_name(fp8_recipe)
    # torchao's tensorwise recipe casts gradients to e5m2 (Megatron's "hybrid"), its rowwise one
    # to e4m3: the format sets that dtype, for both GEMMs that read the output gradient.
    gradient = dataclasses.replace(
        config.cast_config_grad_output,
        target_dtype=e5m2_dtype if fp8_format == "hybrid" else e4m3_dtype,
    )
    return dataclasses.replace(
        config,
        cast_config_grad_output=gradient,
        cast_config_grad_output_for_grad_weight=gradient,
        emulate=emulate,
    )


def convert_to_float8_training(
    module: nn.Module,
    fp8_format: str,
    fp8_recipe: str,
    module_filter: Callable[[nn.Module, str], bool],
    emulate: bool = False,
) -> list[str]:
    """Swap, in place, every `nn.Linear` under `module` (not `module` itself) that
    `module_filter(linear, its name under module)` accepts for a float8 one; return their names.

    Raises:
        ValueError: a format and recipe `fp8_choice_problem` refuses.
    """
    config = float8_linear_config(fp8_format, fp8_recipe, emulate)
    converted: list[str] = []

    def accept(linear: nn.Module, name: str) -> bool:
        if name and module_filter(linear, name):
            converted.append(name)
            return True
        return False

    torchao_convert(module, module_filter_fn=accept, config=config)
    return converted


def is_float8_linear(module: nn.Module) -> bool:
    """Whether `module` runs its GEMM in FP8 (a torchao Float8Linear)."""
    return isinstance(module, Float8Linear)
