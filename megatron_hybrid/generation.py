"""Sampling from a model with recurrent state: a batch of prompts is prefilled in one pass, then
every new token costs one decoding step whose work does not grow with the context for Mamba2
layers (a fixed-size state) and grows linearly for attention (its KV cache).

    new = generate(model, [prompt_a, prompt_b], 64, Sampling(temperature=0))   # greedy
    new = generate(model, prompts, 64, Sampling(temperature=0.8, top_p=0.95, seed=1))

Prompts of different lengths are right-padded into one batch; each sequence mixer keeps every
row's state at its own length (megatron_hybrid/layers/decoding.py). The model runs whole, in one
process (`HybridModel.prefill` / `decode_step`): the `megatron-hybrid-generate` command loads a
checkpoint of any layout into such a model, and the training script's end-of-run sample gathers
its parallel parts into one (megatron_hybrid/parallel/whole_model.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_hybrid.decode_graph import GraphedDecodeStep, graph_decoding_problem
from megatron_hybrid.model import HybridModel


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits: `temperature` 0 is greedy (argmax);
    otherwise logits / temperature, restricted to the `top_k` most likely tokens and then to the
    smallest set whose probability reaches `top_p` (the most likely token always stays), drawn
    from a generator seeded with `seed` (the same settings, prompts and model give the same
    tokens)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None: no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None: no limit), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling(temperature=0.0)


def next_tokens(
    logits_BV: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of `logits_BV` (float32 or wider), as `sampling` says."""
    if sampling.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits_BV.shape[-1]:
        kth_best = logits_BV.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_best, -math.inf)
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (never the first).
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, -math.inf)
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: HybridModel,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    vocab_limit: int | None = None,
    stop_id: int | None = None,
    cuda_graph: bool | None = None,
) -> list[torch.Tensor]:
    """Extend each prompt (token ids; lengths may differ) by up to `max_new_tokens` tokens.

    Returns, per prompt, the new tokens only (CPU, int64): `max_new_tokens` of them, or fewer
    when `stop_id` came up (included). `vocab_limit` keeps the padding rows of the embedding
    (ids >= the tokenizer's size) from being drawn. The model runs in eval mode on its own
    device and is put back in its previous mode.

    `cuda_graph`: replay each decoding step from a CUDA graph (megatron_hybrid/decode_graph.py):
    the same tokens, without the per-kernel launch cost that dominates a small batch's step.
    None (default) uses one wherever it can (CUDA, no MoE layers); True insists (ValueError
    saying why where it cannot); False decodes eagerly.

    Raises ValueError for an empty batch or prompt, ids outside the vocabulary, or logits that
    are NaN or infinite (weights no longer finite)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    tokens_BT, lengths_B = right_padded(prompts, vocab, device)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in prompts]
    limit = vocab if vocab_limit is None else min(vocab_limit, vocab)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    try:
        capacity = tokens_BT.shape[1] + max_new_tokens
        logits_BV, states = model.prefill(tokens_BT, lengths_B, capacity)
        step = _decoding_step(model, states, len(prompts), max_new_tokens, cuda_graph, device)
        new, finite = [], torch.ones((), dtype=torch.bool, device=device)
        stopped = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            logits_BV = logits_BV[:, :limit].float()
            finite &= torch.isfinite(logits_BV).all()
            token_B = next_tokens(logits_BV, sampling, generator)
            new.append(token_B)
            if stop_id is not None:
                stopped |= token_B == stop_id
                if bool(stopped.all()):
                    break
            if i + 1 < max_new_tokens:
                logits_BV = step(token_B)
    finally:
        model.train(was_training)
    if not bool(finite):
        raise ValueError(
            "the model's logits are NaN or infinite (its weights are no longer finite?): "
            "there is nothing to sample from"
        )
    return [until_stop(row, stop_id) for row in torch.stack(new, dim=1).cpu()]


def _decoding_step(model, states, batch: int, max_new_tokens: int, cuda_graph, device):
    """token_B -> logits_BV, advancing `states`: a graph replay or an eager decode_step."""
    if cuda_graph is not False:
        problem = graph_decoding_problem(model, device)
        if problem is not None and cuda_graph:
            raise ValueError(f"cuda_graph=True: {problem}")
        # Capturing costs about two eager steps: not worth it for one or two new tokens.
        if problem is None and max_new_tokens > 2:
            return GraphedDecodeStep(model, states, batch)
    return lambda token_B: model.decode_step(token_B, states)


def right_padded(
    prompts: Sequence[Sequence[int] | torch.Tensor], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, longest) right-padded with 0, lengths (B,)), checked against the vocabulary."""
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    for index, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
        if row.min() < 0 or row.max() >= vocab:
            raise ValueError(
                f"prompt {index} holds token ids outside the model's vocabulary 0..{vocab - 1} "
                f"(min {int(row.min())}, max {int(row.max())})"
            )
    lengths = torch.tensor([row.numel() for row in rows])
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : row.numel()] = row
    return tokens.to(device), lengths.to(device)


def until_stop(tokens: torch.Tensor, stop_id: int | None) -> torch.Tensor:
    """`tokens` up to and including the first `stop_id`."""
    if stop_id is None:
        return tokens
    hits = (tokens == stop_id).nonzero()
    return tokens if hits.numel() == 0 else tokens[: int(hits[0]) + 1]
