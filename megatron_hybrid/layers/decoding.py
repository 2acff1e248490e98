"""How a sequence mixer decodes with state: the interface generation drives (megatron_hybrid/
generation.py through HybridModel.prefill / decode_step and HybridBlock).

A sequence mixer (`M`, `*`, and any new one) provides two methods beside its forward:

    prefill(x_BTH, lengths_B, capacity) -> (y_BTH, state)
        One pass over a batch of prompts, right-padded to T: row b's real positions are
        0 .. lengths_B[b] - 1. `y_BTH` must equal `forward(x_BTH)` at the real positions (a causal
        mixer gives that for free: padding comes after them), and `state` is what the mixer
        needs to continue each row right after its last real position, ignoring the padding.
        `capacity` is the most positions a row will reach (prompt plus new tokens), for
        buffers that grow with the context (a KV cache).

    step(x_B1H, state) -> y_B1H
        One new position per row; `state` advances in place (so buffers are reused and a decoding
        step has no Python-visible outputs besides y).

The state is the mixer's own object (Mamba2State, KVCache): nothing outside the mixer reads it.
Channel mixers (`-`, `E`) act on each position alone, so they have no state and decode through
their forward on [B, 1, H].
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class DecodingMixer(Protocol):
    """A sequence mixer that can generate with state (see the module docstring)."""

    def prefill(
        self, x_BTH: torch.Tensor, lengths_B: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, Any]: ...

    def step(self, x_B1H: torch.Tensor, state: Any) -> torch.Tensor: ...


def real_positions(lengths_B: torch.Tensor, seq: int) -> torch.Tensor:
    """(B, seq) bool: True at each row's real positions, False on the right padding."""
    return torch.arange(seq, device=lengths_B.device) < lengths_B.unsqueeze(1)
