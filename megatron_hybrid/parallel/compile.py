"""`--compile`: torch.compile per physical block (after tensor
parallelism and activation checkpointing, before FSDP).

Compiling block by block rather than the whole model keeps compile time proportional to the
number of *distinct* blocks (blocks of one kind share the compiled code) and leaves FSDP's
per-block hooks outside the compiled regions. The Triton kernels are `torch.library` custom ops
with fake kernels, so they trace without graph breaks."""

from __future__ import annotations

from megatron_hybrid.model import HybridModel


def apply_compile(model: HybridModel, mode: str | None = None, log=print) -> None:
    """Compile every block of `model` (the decoder's and the MTP depths') in place
    (`nn.Module.compile`, so module names, parameters and checkpoint keys do not change). `mode`
    is torch.compile's ("reduce-overhead" adds CUDA graphs, "max-autotune", ...)."""
    blocks = [block for stack in model.block_stacks() for block in stack.layers.values()]
    for block in blocks:
        block.compile(mode=mode)
    log(
        f"torch.compile{f' ({mode})' if mode else ''}: {len(blocks)} blocks compiled (on first use)"
    )
