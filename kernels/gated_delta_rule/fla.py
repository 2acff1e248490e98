"""The `gated_delta_rule` op on flash-linear-attention's Triton kernels (`fla-core`, optional,
CUDA only): `fla.ops.gated_delta_rule.chunk_gated_delta_rule`, the kernel Megatron-Core's
GatedDeltaNet calls. Imported only when the registry binds it, so a machine without fla never
imports it (the registry's `requires` says how to install it).

fla takes grouped value heads as they are (q, k with key_heads, v with a multiple of them), keeps
its state in the same (key_dim, value_dim) layout as the eager op, and computes in float32. Like
fla's own layers and Megatron-Core, q, k, v and beta are handed over in one dtype (v's) and the
log decays g in float32.
"""

from __future__ import annotations

import torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk_gated_delta_rule

from megatron_hybrid.kernels.gated_delta_rule.eager import (
    DEFAULT_CHUNK_SIZE,
    check_gated_delta_rule_args,
)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The eager op's contract (kernels/gated_delta_rule/eager.py) on fla's kernel. fla
    supports chunks of 16, 32 and 64 positions only (it raises for others)."""
    check_gated_delta_rule_args(
        q, k, v, g, beta, initial_state, chunk_size, name="gated_delta_rule=fla"
    )
    dtype = v.dtype
    # Older fla releases take no chunk_size and always use 64: pass it only when it differs.
    options = {} if chunk_size == DEFAULT_CHUNK_SIZE else {"chunk_size": chunk_size}
    o, final_state = _fla_chunk_gated_delta_rule(
        q.to(dtype).contiguous(),
        k.to(dtype).contiguous(),
        v.contiguous(),
        g.float().contiguous(),
        beta.to(dtype).contiguous(),
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float().contiguous(),
        output_final_state=output_final_state,
        **options,
    )
    return o.to(dtype), final_state
