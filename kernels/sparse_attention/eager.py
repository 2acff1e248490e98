"""Top-k sparse attention in plain PyTorch: the eager reference of the `sparse_attention` op
(DeepSeek sparse attention's attention over the keys its indexer selected). It builds the dense
(T x T) selection mask, so it is O(T^2) in memory; a fast kernel would gather the k selected keys
per query instead."""

from __future__ import annotations

import torch


def selection_mask(topk_indices_BTK: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(B, T, num_keys) bool: True where the query's top-k list names the key (-1: no key)."""
    batch, seq, _ = topk_indices_BTK.shape
    # -1 points at a spare last column, dropped after the scatter (duplicates all write True).
    index = torch.where(topk_indices_BTK < 0, num_keys, topk_indices_BTK)
    mask = torch.zeros(batch, seq, num_keys + 1, dtype=torch.bool, device=index.device)
    return mask.scatter_(-1, index, True)[..., :num_keys]


def sparse_attention(
    q_BNTD: torch.Tensor,
    k_BNSD: torch.Tensor,
    v_BNSE: torch.Tensor,
    topk_indices_BTK: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with each query's softmax over its selected keys only: key s is
    in query t's row when `topk_indices_BTK[b, t]` lists s. Every row must select at least one
    key. Scores and softmax in float32 (at least), output in v's dtype."""
    selected = selection_mask(topk_indices_BTK, k_BNSD.shape[-2]).unsqueeze(1)
    compute = torch.promote_types(q_BNTD.dtype, torch.float32)
    scores = torch.matmul(q_BNTD.to(compute), k_BNSD.to(compute).transpose(-1, -2)) * scale
    probs = scores.masked_fill(~selected, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, v_BNSE.to(compute)).to(v_BNSE.dtype)
