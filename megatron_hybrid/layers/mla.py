"""Multi-latent attention (MLA; DeepSeek-V2, section 2.1), the `+` mixer, as Megatron-Core's
MLASelfAttention computes it. With n heads and per-head dims dn = qk_head_dim,
dr = qk_pos_emb_head_dim, dv = v_head_dim:

    q              = linear_q_up_proj(q_layernorm(linear_q_down_proj(x)))    with q_lora_rank
                   = linear_q_proj(x)                                         without
                     per head [q_nope (dn), q_pe (dr)]
    [c_kv, k_pe]   = linear_kv_down_proj(x)                  (kv_lora_rank + dr), k_pe one per token
    [k_nope, v]    = linear_kv_up_proj(kv_layernorm(c_kv))   per head [k_nope (dn), v (dv)]
    q_pe, k_pe     rotated (rope, or YaRN-scaled rope): position enters through these dims only
    o_h            = softmax(([q_nope, q_pe]_h . [k_nope_h, k_pe]) * scale, causal) v_h
    out            = linear_proj([o_1 ... o_n])

The latent norms (RMSNorm) exist with `qk_layernorm`. scale = m^2 / sqrt(dn + dr), m YaRN's
temperature factor (1 without context extension). The rope dims are stored interleaved, as in
DeepSeek's and Megatron's checkpoints: pair i is dims (2i, 2i + 1). They are de-interleaved into
the rotate-half order of the `rotary` op first; q and k get the same permutation, so every score
is that of interleaved rope.

Decoding (megatron_hybrid/layers/decoding.py): a KV cache of the heads' keys (rope applied) and
values; a step computes the new token's query, key and value at its row's position.

Tensor parallelism splits the heads (linear_q_proj / linear_q_up_proj / linear_kv_up_proj rows,
linear_proj columns; every head's rows are contiguous) and replicates the down-projections and
latent norms. The layer reads its number of heads off the weights. The shared rope key k_pe
enters the heads through `self.rope_key` (an identity): each rank's heads give it one part of its
gradient, and tensor parallelism sums the parts there (megatron_hybrid/specs/mla.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.decoding import KVCache
from megatron_hybrid.layers.norm import RMSNorm
from megatron_hybrid.layers.rotary import (
    Yarn,
    cos_sin_at,
    inverse_frequencies,
    rotary_per_row,
    yarn_mscale,
)

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


class QueryKeyValue(NamedTuple):
    """MLA's attention inputs, (B, heads, T, .), and the query latent the projections started
    from (the DSA indexer reads it)."""

    query: torch.Tensor  # (B, n, T, dn + dr), rope applied
    key: torch.Tensor  # (B, n, T, dn + dr), rope applied
    value: torch.Tensor  # (B, n, T, dv)
    query_latent: torch.Tensor  # (B, T, q_lora_rank), normed; x itself without q_lora_rank


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Dims (0, 1, 2, 3, ...) -> (0, 2, ..., 1, 3, ...): interleaved rope pairs into rotate-half
    order."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class RopeTables:
    """cos and sin tables of MLA's rope dims: plain rope, or YaRN (megatron_hybrid/layers/
    rotary.py), from the config's rope fields."""

    def __init__(self, config: ModelConfig):
        self.dim = config.qk_pos_emb_head_dim
        self.base = config.rotary_base
        self.yarn = None
        if config.rope_type == "yarn":
            self.yarn = Yarn(
                factor=config.rotary_scaling_factor,
                original_max_position_embeddings=config.original_max_position_embeddings,
                beta_fast=config.beta_fast,
                beta_slow=config.beta_slow,
                mscale=config.mscale,
                mscale_all_dim=config.mscale_all_dim,
            )

    def __call__(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        """Tables of positions 0 .. seq_len - 1."""
        return self.at(torch.arange(seq_len, device=device), dtype)

    def at(self, positions: torch.Tensor, dtype: torch.dtype):
        """Tables with one row per entry of `positions`."""
        device = positions.device
        if self.yarn is None:
            return cos_sin_at(inverse_frequencies(self.dim, self.base, device), positions, dtype)
        inv_freq = self.yarn.inverse_frequencies(self.dim, self.base, device)
        return cos_sin_at(inv_freq, positions, dtype, self.yarn.concentration)


def softmax_scale(config: ModelConfig) -> float:
    """m^2 / sqrt(dn + dr), m = YaRN's temperature factor (Megatron-Core applies it for either
    rope type)."""
    m = yarn_mscale(config.rotary_scaling_factor, config.mscale_all_dim)
    return m * m / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)


class MultiLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        self.kernels = kernels or eager_kernels()
        heads, hidden, eps = (
            config.num_attention_heads,
            config.hidden_size,
            config.layernorm_epsilon,
        )
        self.qk_head_dim = config.qk_head_dim
        self.pos_dim = config.qk_pos_emb_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        q_head_dim = self.qk_head_dim + self.pos_dim
        if config.q_lora_rank is None:
            self.linear_q_proj = nn.Linear(hidden, heads * q_head_dim, bias=False)
        else:
            self.linear_q_down_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            if config.qk_layernorm:
                self.q_layernorm = RMSNorm(config.q_lora_rank, eps, self.kernels)
            self.linear_q_up_proj = nn.Linear(config.q_lora_rank, heads * q_head_dim, bias=False)
        self.linear_kv_down_proj = nn.Linear(hidden, self.kv_lora_rank + self.pos_dim, bias=False)
        if config.qk_layernorm:
            self.kv_layernorm = RMSNorm(self.kv_lora_rank, eps, self.kernels)
        kv_up_rows = heads * (self.qk_head_dim + self.v_head_dim)
        self.linear_kv_up_proj = nn.Linear(self.kv_lora_rank, kv_up_rows, bias=False)
        self.rope_key = nn.Identity()  # where k_pe enters the heads (module docstring)
        self.linear_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=False)
        self.rope_tables = RopeTables(config)
        self.softmax_scale = softmax_scale(config)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, name, None)
        return x if norm is None else norm(x)

    def query_latent_and_query(self, x_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "linear_q_proj"):
            return x_BTH, self.linear_q_proj(x_BTH)
        latent = self._norm("q_layernorm", self.linear_q_down_proj(x_BTH))
        return latent, self.linear_q_up_proj(latent)

    def rope_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def query_key_value(
        self, x_BTH: torch.Tensor, positions_B: torch.Tensor | None = None
    ) -> QueryKeyValue:
        """Queries, keys and values of `x_BTH` at positions 0 .. T - 1, or, with `positions_B`,
        of a decoding step's one position per row."""
        batch, seq, _ = x_BTH.shape
        dn, dr, dv = self.qk_head_dim, self.pos_dim, self.v_head_dim
        query_latent, q = self.query_latent_and_query(x_BTH)
        q_nope, q_pe = q.view(batch, seq, -1, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
        kv_latent, k_pe = self.linear_kv_down_proj(x_BTH).split([self.kv_lora_rank, dr], dim=-1)
        kv = self.linear_kv_up_proj(self._norm("kv_layernorm", kv_latent))
        k_nope, value = kv.view(batch, seq, -1, dn + dv).transpose(1, 2).split([dn, dv], dim=-1)
        q_pe, k_pe = deinterleave(q_pe), deinterleave(self.rope_key(k_pe)).unsqueeze(1)
        if positions_B is None:
            cos, sin = self.rope_tables(seq, x_BTH.device, self.rope_dtype(q))
            q_pe, k_pe = self.kernels.rotary(q_pe, cos, sin), self.kernels.rotary(k_pe, cos, sin)
        else:
            cos, sin = self.rope_tables.at(positions_B, self.rope_dtype(q))
            q_pe = rotary_per_row(self.kernels.rotary, q_pe, cos, sin)
            k_pe = rotary_per_row(self.kernels.rotary, k_pe, cos, sin)
        heads = q_nope.shape[1]
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(-1, heads, -1, -1)], dim=-1)
        return QueryKeyValue(query, key, value, query_latent)

    def attend(self, qkv: QueryKeyValue, x_BTH: torch.Tensor) -> torch.Tensor:
        """Causal softmax attention of every query over every earlier key: (B, n, T, dv)."""
        return F.scaled_dot_product_attention(
            qkv.query, qkv.key, qkv.value, is_causal=True, scale=self.softmax_scale
        )

    def output(self, out_BNTV: torch.Tensor) -> torch.Tensor:
        return self.linear_proj(out_BNTV.transpose(1, 2).flatten(2))

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        return self.output(self.attend(self.query_key_value(x_BTH), x_BTH))

    # -- decoding (megatron_hybrid/layers/decoding.py) ------------------------------------------
    def prefill(
        self, x_BTH: torch.Tensor, lengths_B: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, KVCache]:
        """The forward over right-padded prompts, and their keys and values cached in buffers of
        `capacity` positions. (Causal attention keeps the real positions off the padding.)"""
        qkv = self.query_key_value(x_BTH)
        return self.output(self.attend(qkv, x_BTH)), KVCache.prefilled(
            qkv.key, qkv.value, lengths_B, capacity
        )

    def step(self, x_B1H: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attend from one new position per row (row b's at cache.lengths[b]) over its cached
        positions and itself; its key and value join the cache."""
        qkv = self.query_key_value(x_B1H, cache.lengths)
        cache.append(qkv.key, qkv.value)
        keys, values = cache.cached()
        out = F.scaled_dot_product_attention(
            qkv.query,
            keys,
            values,
            attn_mask=cache.visible()[:, None, None, :],
            scale=self.softmax_scale,
        )
        return self.output(out)
