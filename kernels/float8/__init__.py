"""FP8 training of dense GEMMs (`--fp8-format`, `--fp8-recipe`): which formats and recipes exist,
which of them run here, and why the others do not. torchao.py swaps `nn.Linear` layers for
torchao's float8 ones; it is imported only when the registry binds it (torchao is optional).

Megatron-LM's choices and spelling: `--fp8-format e4m3|hybrid` (e4m3 everywhere, or e4m3 for
activations and weights with e5m2 for the output gradients) and `--fp8-recipe tensorwise|
delayed|mxfp8|blockwise|custom`. Here the recipes are torchao's: `tensorwise` (one dynamic scale
per tensor, Megatron's `tensorwise` current scaling) and `rowwise` (torchao's, one scale per row,
not a Megatron choice). Megatron's default recipe, `delayed`, scales from an amax history kept
across steps, which torchao's float8 training does not implement, so the default here is
`tensorwise`.
"""

from __future__ import annotations

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "rowwise")
DEFAULT_FP8_RECIPE = "tensorwise"

# Megatron-LM's recipes that no torchao float8 recipe implements: the flag accepts them (the
# same spelling as Megatron's) and refuses them with the reason.
UNSUPPORTED_MEGATRON_RECIPES = {
    "delayed": "delayed scaling keeps an amax history across steps (Transformer Engine); "
    "torchao scales each tensor from its current amax only (tensorwise is the nearest)",
    "mxfp8": "MXFP8 block scaling needs compute capability 10.0 (Blackwell) and torchao's MX "
    "training, which is not wired in here",
    "blockwise": "Transformer Engine's 1x128 / 128x128 block scaling has no torchao float8 recipe",
    "custom": "a custom quantizer factory (--fp8-quantizer-factory) is Transformer Engine's",
}
RECIPE_CHOICES = FP8_RECIPES + tuple(UNSUPPORTED_MEGATRON_RECIPES)

# FP8 GEMMs (torch._scaled_mm) need both dimensions of the second operand, and the inner
# dimension, to be multiples of 16.
FP8_DIM_MULTIPLE = 16


def fp8_choice_problem(fp8_format: str, fp8_recipe: str) -> str | None:
    """Why `--fp8-format fp8_format --fp8-recipe fp8_recipe` cannot run here (any device), or
    None when it can."""
    supported = (
        f"supported: --fp8-format {' or '.join(FP8_FORMATS)} with --fp8-recipe "
        f"{' or '.join(FP8_RECIPES)} (hybrid with tensorwise only)"
    )
    if fp8_format not in FP8_FORMATS:
        return f"--fp8-format {fp8_format!r} is not a format; {supported}"
    if fp8_recipe in UNSUPPORTED_MEGATRON_RECIPES:
        reason = UNSUPPORTED_MEGATRON_RECIPES[fp8_recipe]
        return f"--fp8-recipe {fp8_recipe} is not supported: {reason}; {supported}"
    if fp8_recipe not in FP8_RECIPES:
        return f"--fp8-recipe {fp8_recipe!r} is not a recipe; {supported}"
    if fp8_format == "hybrid" and fp8_recipe == "rowwise":
        return (
            "--fp8-format hybrid with --fp8-recipe rowwise is not supported: torchao's rowwise "
            "recipe casts the gradients to e4m3, and an e5m2 rowwise variant is not one of its "
            f"recipes; {supported}"
        )
    return None
