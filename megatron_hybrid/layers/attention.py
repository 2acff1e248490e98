"""Causal self-attention with grouped-query attention and optional rotary embedding; decodes with
a KV cache (`prefill` / `step`, megatron_hybrid/layers/decoding.py).

`linear_qkv` packs q, k and v in Megatron's grouped layout: for each query group its
`heads_per_group` query heads, then its key head, then its value head,
so a tensor-parallel split over groups is a contiguous split of rows. The forward reads the
number of groups it holds off linear_qkv's output (`view(..., -1, ...)`), so it runs unchanged
on a tensor-parallel rank's groups; `num_heads` and `num_groups` are the sizes it was built with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.decoding import KVCache
from megatron_hybrid.layers.rotary import rotary_cos_sin_at, rotary_per_row

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        self.kernels = kernels or eager_kernels()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups
        self.heads_per_group = self.num_heads // self.num_groups
        self.head_dim = config.kv_channels
        self.use_rope = config.position_embedding_type == "rope"
        self.rotary_base = config.rotary_base
        qkv_rows = self.num_groups * (self.heads_per_group + 2) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_rows, bias=False)
        self.linear_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def split_qkv(self, qkv_BTX: torch.Tensor):
        """Unpack the grouped layout into q (B, heads, T, d) and k, v (B, groups, T, d)."""
        batch, seq, _ = qkv_BTX.shape
        per_group = self.heads_per_group
        qkv = qkv_BTX.view(batch, seq, -1, per_group + 2, self.head_dim)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = k.squeeze(3).transpose(1, 2)
        v = v.squeeze(3).transpose(1, 2)
        return q, k, v

    def project(self, x_BTD: torch.Tensor, positions: torch.Tensor, per_row: bool = False):
        """q (B, heads, T, d) and k, v (B, groups, T, d) of `x_BTD`, rotary applied at
        `positions`: (T,) shared by the rows, or with `per_row` (B,), one per row of a single
        position (a decoding step)."""
        q, k, v = self.split_qkv(self.linear_qkv(x_BTD))
        if self.use_rope:
            cos, sin = rotary_cos_sin_at(
                positions,
                self.head_dim,
                self.rotary_base,
                torch.promote_types(q.dtype, torch.float32),
            )
            if per_row:
                q = rotary_per_row(self.kernels.rotary, q, cos, sin)
                k = rotary_per_row(self.kernels.rotary, k, cos, sin)
            else:
                q, k = self.kernels.rotary(q, cos, sin), self.kernels.rotary(k, cos, sin)
        return q, k, v

    def output(self, out_BhTd: torch.Tensor) -> torch.Tensor:
        batch, _, seq, _ = out_BhTd.shape
        return self.linear_proj(out_BhTd.transpose(1, 2).reshape(batch, seq, -1))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x_BTD, torch.arange(x_BTD.shape[1], device=x_BTD.device))
        # Query head h attends with key/value group h // heads_per_group (enable_gqa semantics).
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.heads_per_group != 1
        )
        return self.output(out)

    # -- decoding (megatron_hybrid/layers/decoding.py) ------------------------------------------
    def prefill(
        self, x_BTD: torch.Tensor, lengths_B: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, KVCache]:
        """The forward over right-padded prompts, and their keys and values cached in buffers of
        `capacity` positions. (Causal attention keeps the real positions off the padding.)"""
        q, k, v = self.project(x_BTD, torch.arange(x_BTD.shape[1], device=x_BTD.device))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.heads_per_group != 1
        )
        return self.output(out), KVCache.prefilled(k, v, lengths_B, capacity)

    def step(self, x_B1D: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attend from one new position per row (row b's at cache.lengths[b]) over its cached
        positions and itself; its key and value join the cache."""
        q, k, v = self.project(x_B1D, cache.lengths, per_row=True)
        cache.append(k, v)
        keys, values = cache.cached()
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=cache.visible()[:, None, None, :],
            enable_gqa=self.heads_per_group != 1,
        )
        return self.output(out)
