"""Sampling text from a model, recomputing the whole context each step (no state cache yet)."""

from __future__ import annotations

import torch

from megatron_hybrid.model import HybridModel


@torch.no_grad()
def generate(
    model: HybridModel,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    context_length: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    vocab_limit: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Extend `prompt_ids` (1-D) by `max_new_tokens` sampled tokens; returns only the new ones.

    `vocab_limit` excludes the padding rows of the embedding (ids >= the tokenizer's size);
    temperature 0 means greedy decoding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = prompt_ids.to(device).view(1, -1)
    new_tokens = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -context_length:])[0, -1].float().cpu()
        if not torch.isfinite(logits).all():
            raise ValueError(
                "the model's logits are NaN or infinite (its weights are no longer "
                "finite?): there is nothing to sample from"
            )
        if vocab_limit is not None:
            logits = logits[:vocab_limit]
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                threshold = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        new_tokens.append(next_id)
        tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
    model.train(was_training)
    return torch.tensor(new_tokens, dtype=torch.long)
