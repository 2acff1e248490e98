"""Activation checkpointing per physical block (`--recompute-granularity full|selective`).

- full: a block keeps only its input; its whole forward is recomputed in backward.
- selective: a block keeps the outputs of its GEMMs (FP8 ones included) and attention (the
  expensive ops) and recomputes the cheap, memory-hungry elementwise work (norms, activations,
  gates, the SSD's decay and segment-sum tensors) in backward (torch's selective activation
  checkpointing).

Wrapping adds `_checkpoint_wrapped_module` to parameter names; checkpoints are unaffected
because the checkpoint hooks read state through torch's get/set_model_state_dict, which strip it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from megatron_hybrid.model import HybridModel

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_mm.default,  # the FP8 GEMMs (--fp8-format)
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_expensive_ops(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: HybridModel, granularity: str, log=print) -> None:
    """Wrap every physical block of `model` (the decoder's and the MTP depths') in place."""
    if granularity not in ("full", "selective"):
        raise ValueError(f"unknown recompute granularity {granularity!r}; valid: full, selective")
    count = 0
    for stack in model.block_stacks():
        for name, block in list(stack.layers.items()):
            if granularity == "full":
                wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
            else:
                wrapped = checkpoint_wrapper(
                    block,
                    preserve_rng_state=False,
                    context_fn=partial(create_selective_checkpoint_contexts, _save_expensive_ops),
                )
            stack.layers[name] = wrapped
            count += 1
    log(f"activation checkpointing ({granularity}) on {count} blocks")
