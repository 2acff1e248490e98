"""One decoding step captured as a CUDA graph and replayed for every new token.

A decoding step of a small batch launches a few hundred small kernels (every layer's
projections, conv and SSM steps, norms), each taking microseconds on the GPU, so eager Python
and launch overhead, not the GPU, set the time per token. A CUDA graph records the step's
kernels once and replays them with one launch. That needs every step to read and write the
same memory with the same shapes:

- the token ids come in through one input buffer, and the logits leave through one output
  buffer (overwritten by the next step: read them before);
- Mamba2 and Gated DeltaNet states advance in place already (megatron_hybrid/layers/decoding.py);
- KV caches read their whole buffers with the unwritten positions masked (`KVCache.whole`), so
  attention's shapes do not change as the cache fills; each replay then moves the caches'
  host-side counters on, which the replay itself cannot do (it runs no Python).

MoE layers count tokens per expert with `torch.bincount`, whose output size the host reads from
the GPU: that cannot be captured, so a model with MoE layers decodes eagerly
(`graph_decoding_problem` says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from megatron_hybrid.layers.decoding import KVCache
from megatron_hybrid.model import HybridModel


def graph_decoding_problem(model: HybridModel, device: torch.device) -> str | None:
    """Why `model` cannot decode through a CUDA graph on `device`, or None if it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device}"
    if model.moe_layers():
        return (
            "MoE layers read their per-expert token counts on the host (torch.bincount), which "
            "a CUDA graph cannot capture"
        )
    return None


class GraphedDecodeStep:
    """`HybridModel.decode_step(tokens, states)` for one batch of `states` (from `prefill`),
    replayed from a CUDA graph: call it with the next token of every row; it returns the
    logits (B, vocab) in a buffer that the next call overwrites."""

    def __init__(self, model: HybridModel, states: dict[str, object], batch: int):
        device = next(model.parameters()).device
        problem = graph_decoding_problem(model, device)
        if problem is not None:
            raise ValueError(f"cannot decode through a CUDA graph: {problem}")
        self.caches = list(_kv_caches(states))
        for cache in self.caches:
            cache.whole = True
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        state_tensors = list(_tensors(states))
        saved = [t.clone() for t in state_tensors]
        filled = [cache.filled for cache in self.caches]

        def restore() -> None:
            for tensor, copy in zip(state_tensors, saved, strict=True):
                tensor.copy_(copy)
            for cache, count in zip(self.caches, filled, strict=True):
                cache.filled = count

        # A first step outside the graph compiles and autotunes the Triton kernels and warms
        # the allocator (a capture may not do either); it advances the states, so they are
        # put back. The capture runs the Python once and nothing on the GPU, but moves the
        # caches' host counters: put back too.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model.decode_step(self.tokens, states)
        torch.cuda.current_stream(device).wait_stream(side)
        restore()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, states)
        restore()

    def __call__(self, tokens_B: torch.Tensor) -> torch.Tensor:
        for cache in self.caches:
            cache.check_room()
        self.tokens.copy_(tokens_B)
        self.graph.replay()
        for cache in self.caches:
            cache.filled += 1
        return self.logits


def _kv_caches(states: object) -> Iterator[KVCache]:
    return _found(states, KVCache)


def _tensors(states: object) -> Iterator[torch.Tensor]:
    """Every tensor in the decoding states (dicts of the mixers' state dataclasses)."""
    return _found(states, torch.Tensor)


def _found(state: object, kind: type) -> Iterator:
    """Every instance of `kind` in `state`, through dicts and dataclass fields."""
    if isinstance(state, kind):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _found(value, kind)
    elif dataclasses.is_dataclass(state):
        for field in dataclasses.fields(state):
            yield from _found(getattr(state, field.name), kind)
