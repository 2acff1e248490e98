"""Causal self-attention with grouped-query attention and optional rotary embedding.

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
from megatron_hybrid.layers.rotary import rotary_cos_sin

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

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x_BTD.shape
        q, k, v = self.split_qkv(self.linear_qkv(x_BTD))
        if self.use_rope:
            cos, sin = rotary_cos_sin(
                seq,
                self.head_dim,
                self.rotary_base,
                x_BTD.device,
                torch.promote_types(q.dtype, torch.float32),
            )
            q, k = self.kernels.rotary(q, cos, sin), self.kernels.rotary(k, cos, sin)
        # Query head h attends with key/value group h // heads_per_group (enable_gqa semantics).
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.heads_per_group != 1
        )
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.linear_proj(out)
