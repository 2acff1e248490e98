"""DeepSeek sparse attention (DSA; DeepSeek-V3.2, section 2.1), the `D` mixer, as Megatron-Core's
DSAttention computes it: multi-latent attention (megatron_hybrid/layers/mla.py) in which each
query attends only to the `dsa_indexer_topk` earlier keys a lightning indexer ranks highest.

The indexer (names of Megatron's DSAIndexer), with ni heads of width di and the rope dims dr:

    q^I      = linear_wq_b(c^Q)      per head (di): the MLA query latent (x without q_lora_rank)
    k^I      = k_norm(linear_wk(x))  one per token (di), LayerNorm
    w        = linear_weights_proj(x) / sqrt(ni) / sqrt(di)           per head
    I[t, s]  = sum_j w[t, j] * relu(q^I[t, j] . k^I[s])               for s <= t
    with rope (MLA's tables, rotate-half order) on the first dr dims of q^I and k^I.

Query t then attends, through the `sparse_attention` op, to the keys of its top-k I[t, s] (ties
to the earlier key). The
Hadamard rotation Megatron and DeepSeek apply to q^I and k^I before scoring is left out: it is
orthogonal and applied to both, so every score is unchanged (it exists for FP8 quantization).

The indexer reads detached inputs, and the top-k choice has no gradient: the indexer learns only
from its KL loss (`dsa_indexer_loss_coeff` > 0; Megatron's default 0 leaves it untrained),

    loss = coeff * mean_t KL(p_t || softmax_s(I[t, s])),
    p_t  = normalized sum over heads of softmax(q_t . k_s * scale) over s <= t

(with `dsa_indexer_use_sparse_loss`, both distributions over the selected keys only), computed
from detached queries and keys and added to the gradients by `AuxLossInjector`.

Decoding (megatron_hybrid/layers/decoding.py): MLA's KV cache plus the indexer's keys
(`DSACache`); a step scores the new query against every cached indexer key, takes the top-k as
the forward does (ties to the earlier key) and attends over those keys only.

Tensor parallelism: as MLA, heads split; the indexer stays whole on every rank (it sees the same
inputs everywhere, so every rank selects the same keys), and the sum over heads of the loss's
target is summed over the ranks at `core_attention.head_sum` (an identity it marks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_hybrid.kernels.dtypes import at_least_float32
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.kernels.sparse_attention.eager import selection_mask
from megatron_hybrid.layers.decoding import KVCache, cache_buffer
from megatron_hybrid.layers.mla import MultiLatentAttention, QueryKeyValue
from megatron_hybrid.layers.moe import AuxLossInjector
from megatron_hybrid.layers.rotary import rotary_per_row

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig

# Megatron's floor on the KL target's normalizer and inside its log.
KL_EPS = 1e-10


class LightningIndexer(nn.Module):
    def __init__(self, config: ModelConfig, kernels: BoundKernels):
        super().__init__()
        self.kernels = kernels
        self.num_heads = config.dsa_indexer_n_heads
        self.head_dim = config.dsa_indexer_head_dim
        self.pos_dim = config.qk_pos_emb_head_dim
        hidden = config.hidden_size
        query_latent = config.q_lora_rank if config.q_lora_rank is not None else hidden
        self.linear_wq_b = nn.Linear(query_latent, self.num_heads * self.head_dim, bias=False)
        self.linear_wk = nn.Linear(hidden, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layernorm_epsilon)
        self.linear_weights_proj = nn.Linear(hidden, self.num_heads, bias=False)

    def _rope(self, x: torch.Tensor, cos, sin, per_row: bool = False) -> torch.Tensor:
        """Rope on the first dr dims of x (B, heads, T, di), in rotate-half order (with
        `per_row`, T is 1 and row b is at the position of row b of the tables)."""
        pe, rest = x.split([self.pos_dim, self.head_dim - self.pos_dim], dim=-1)
        if per_row:
            pe = rotary_per_row(self.kernels.rotary, pe, cos, sin)
        else:
            pe = self.kernels.rotary(pe, cos, sin)
        return torch.cat([pe, rest], dim=-1)

    def queries(self, x_BTH, query_latent, cos, sin, per_row: bool = False):
        """(q^I (B, ni, T, di), w (B, T, ni)), in float32 (at least)."""
        batch, seq, _ = x_BTH.shape
        q = self.linear_wq_b(query_latent).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        weights = at_least_float32(self.linear_weights_proj(x_BTH))
        weights = weights / math.sqrt(self.num_heads) / math.sqrt(self.head_dim)
        return at_least_float32(self._rope(q, cos, sin, per_row)), weights

    def keys(self, x_BTH, cos, sin, per_row: bool = False) -> torch.Tensor:
        """k^I (B, 1, T, di), in float32 (at least)."""
        k = self.k_norm(self.linear_wk(x_BTH)).unsqueeze(1)
        return at_least_float32(self._rope(k, cos, sin, per_row))

    @staticmethod
    def scores(q_BJTD, weights_BTJ, k_B1SD) -> torch.Tensor:
        """I (B, T, S) = sum_j w[t, j] relu(q^I[t, j] . k^I[s])."""
        per_head = torch.relu(torch.matmul(q_BJTD, k_B1SD.transpose(-1, -2)))  # (B, ni, T, S)
        return torch.einsum("bjts,btj->bts", per_head, weights_BTJ)

    def forward(self, x_BTH, query_latent, cos, sin) -> torch.Tensor:
        """Index scores I (B, T, T) in float32 (at least), -inf where s > t."""
        seq = x_BTH.shape[1]
        q, weights = self.queries(x_BTH, query_latent, cos, sin)
        scores = self.scores(q, weights, self.keys(x_BTH, cos, sin))
        future = torch.ones(seq, seq, dtype=torch.bool, device=x_BTH.device).triu(1)
        return scores.masked_fill(future, float("-inf"))


def top_k_keys(scores_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, min(k, S)) indices of each query's highest-scoring keys; -1 where fewer than k
    keys are valid (a score of -inf). Equal scores go to the earlier key (a stable sort):
    relu makes many scores exactly 0, and torch.topk's order among ties depends on the row's
    length, which would let a later token (or sequence parallelism's padding) change which
    keys an earlier query sees."""
    values, order = scores_BTS.sort(dim=-1, descending=True, stable=True)
    keep = min(k, scores_BTS.shape[-1])
    return order[..., :keep].masked_fill(values[..., :keep] == float("-inf"), -1)


class SparseCoreAttention(nn.Module):
    """Megatron's `core_attention` of a DSA layer: the indexer, top-k selection, sparse
    attention, and the indexer's loss."""

    def __init__(self, config: ModelConfig, kernels: BoundKernels):
        super().__init__()
        self.kernels = kernels
        self.indexer = LightningIndexer(config, kernels)
        self.head_sum = nn.Identity()  # where the loss target's sum over heads is complete
        self.topk = config.dsa_indexer_topk
        self.loss_coeff = config.dsa_indexer_loss_coeff
        self.sparse_loss = config.dsa_indexer_use_sparse_loss
        # Set by the training loop to 1 / (micro-batches per step), as for MoE's aux loss.
        self.aux_loss_grad_scale = 1.0

    def forward(self, qkv: QueryKeyValue, x_BTH, cos, sin, scale: float) -> torch.Tensor:
        train_indexer = self.training and torch.is_grad_enabled() and self.loss_coeff > 0
        with torch.set_grad_enabled(train_indexer):
            scores = self.indexer(x_BTH.detach(), qkv.query_latent.detach(), cos, sin)
        topk = top_k_keys(scores.detach(), self.topk)
        out = self.kernels.sparse_attention(qkv.query, qkv.key, qkv.value, topk, scale)
        if train_indexer:
            loss = self.indexer_loss(scores, qkv, topk, scale)
            out = AuxLossInjector.apply(out, loss, self.aux_loss_grad_scale)
        return out

    def indexer_loss(self, scores_BTS, qkv: QueryKeyValue, topk, scale: float) -> torch.Tensor:
        """coeff * mean over queries of KL(attention's key distribution || the indexer's)."""
        seq = scores_BTS.shape[-1]
        valid = torch.ones(seq, seq, dtype=torch.bool, device=scores_BTS.device).tril()
        valid = valid.expand_as(scores_BTS)
        if self.sparse_loss:
            valid = valid & selection_mask(topk, seq)
        with torch.no_grad():
            query, key = at_least_float32(qkv.query), at_least_float32(qkv.key)
            attention = torch.matmul(query, key.transpose(-1, -2)) * scale
            attention = attention.masked_fill(~valid.unsqueeze(1), float("-inf")).softmax(-1)
            target = self.head_sum(attention.sum(dim=1))
            target = target / target.sum(-1, keepdim=True).clamp(min=KL_EPS)
        log_predicted = scores_BTS.masked_fill(~valid, float("-inf")).log_softmax(-1)
        terms = target * (target.clamp(min=KL_EPS).log() - log_predicted)
        kl = torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)
        return self.loss_coeff * kl.mean()


@dataclass
class DSACache:
    """A DSA layer's decoding state: MLA's keys and values, and the indexer's keys (B, 1,
    capacity, di) at the same positions."""

    kv: KVCache
    index_keys: torch.Tensor


class DeepSeekSparseAttention(MultiLatentAttention):
    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        kernels = kernels or eager_kernels()
        super().__init__(config, kernels)
        self.core_attention = SparseCoreAttention(config, kernels)

    def attend(self, qkv: QueryKeyValue, x_BTH: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope_tables(x_BTH.shape[1], x_BTH.device, self.rope_dtype(qkv.query))
        return self.core_attention(qkv, x_BTH, cos, sin, self.softmax_scale)

    # -- decoding (megatron_hybrid/layers/decoding.py) ------------------------------------------
    def prefill(
        self, x_BTH: torch.Tensor, lengths_B: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, DSACache]:
        """The forward over right-padded prompts (causal scores keep every real query's keys off
        the padding), and the keys, values and indexer keys cached."""
        qkv = self.query_key_value(x_BTH)
        out = self.attend(qkv, x_BTH)
        cos, sin = self.rope_tables(x_BTH.shape[1], x_BTH.device, self.rope_dtype(qkv.query))
        index_keys = self.core_attention.indexer.keys(x_BTH, cos, sin)
        kv = KVCache.prefilled(qkv.key, qkv.value, lengths_B, capacity)
        return self.output(out), DSACache(kv, cache_buffer(index_keys, capacity))

    def step(self, x_B1H: torch.Tensor, cache: DSACache) -> torch.Tensor:
        """One new position per row: its indexer scores over the cached positions and itself,
        the top-k of them (as the forward chooses), sparse attention over those keys."""
        positions = cache.kv.lengths
        qkv = self.query_key_value(x_B1H, positions)
        cos, sin = self.rope_tables.at(positions, self.rope_dtype(qkv.query))
        indexer = self.core_attention.indexer
        cache.kv.write(cache.index_keys, indexer.keys(x_B1H, cos, sin, per_row=True))
        cache.kv.append(qkv.key, qkv.value)
        q, weights = indexer.queries(x_B1H, qkv.query_latent, cos, sin, per_row=True)
        span = cache.kv.span
        scores = indexer.scores(q, weights, cache.index_keys[:, :, :span])  # (B, 1, span)
        scores = scores.masked_fill(~cache.kv.visible().unsqueeze(1), float("-inf"))
        topk = top_k_keys(scores, self.core_attention.topk)
        keys, values = cache.kv.cached()
        out = self.kernels.sparse_attention(qkv.query, keys, values, topk, self.softmax_scale)
        return self.output(out)
