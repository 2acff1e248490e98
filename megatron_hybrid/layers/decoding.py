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

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


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


def conv_window(x_BTC: torch.Tensor, lengths_B: torch.Tensor, width: int) -> torch.Tensor:
    """(B, channels, width): each row's last `width` inputs of a causal conv before position
    lengths_B[b], oldest first, zeros before the start (the conv's own padding): the state
    the `causal_conv1d_step` op continues from."""
    padded = F.pad(x_BTC, (0, 0, width, 0))  # input position t is padded row t + width
    rows = torch.arange(x_BTC.shape[0], device=x_BTC.device).unsqueeze(1)
    steps = lengths_B.unsqueeze(1) + torch.arange(width, device=x_BTC.device)
    return padded[rows, steps].transpose(1, 2).contiguous()


def cache_buffer(x_BGTD: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, G, capacity, D) zeros holding `x_BGTD` in its first T positions."""
    batch, groups, seq, dim = x_BGTD.shape
    if capacity < seq:
        raise ValueError(f"cache capacity {capacity} is below the prompt length {seq}")
    buffer = x_BGTD.new_zeros(batch, groups, capacity, dim)
    buffer[:, :, :seq] = x_BGTD
    return buffer


@dataclass
class KVCache:
    """Keys and values of every cached position, per row (attention's state; MLA's too).

    keys, values: (batch, groups or heads, capacity, dim), rotary already applied to the keys;
    row b's positions 0 .. lengths[b] - 1 are real (a prefill's right padding sits beyond them
    until decoding overwrites it). `filled` (a host int) is how many positions any row has
    written, so a step attends over `[:filled]` without reading lengths back from the device.
    With `whole` set, a step reads every position of the buffers instead, the unwritten ones
    masked: the same result, with shapes that do not change from token to token, which a step
    captured once as a CUDA graph needs (megatron_hybrid/decode_graph.py).
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    filled: int
    whole: bool = False

    @classmethod
    def prefilled(cls, keys_BGTD, values_BGTD, lengths_B, capacity: int) -> KVCache:
        """A cache of `capacity` positions holding a prefill's keys and values."""
        keys, values = cache_buffer(keys_BGTD, capacity), cache_buffer(values_BGTD, capacity)
        return cls(keys, values, lengths_B.clone(), filled=keys_BGTD.shape[2])

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def span(self) -> int:
        """How many leading positions a step reads: the written ones, or all with `whole`."""
        return self.capacity if self.whole else self.filled

    def check_room(self) -> None:
        """Raise ValueError if no position is left for one more token."""
        if self.filled >= self.capacity:
            raise ValueError(
                f"KV cache full: all {self.capacity} positions are used; prefill with a larger "
                "capacity (prompt length + new tokens)"
            )

    def write(self, buffer: torch.Tensor, x_BG1D: torch.Tensor) -> None:
        """Write one new position per row into `buffer` (B, G, capacity, D), at each row's
        length: a cache of more per-position tensors than keys and values writes them here,
        before `append` moves the lengths on."""
        self.check_room()
        rows = torch.arange(buffer.shape[0], device=buffer.device)
        buffer[rows, :, self.lengths] = x_BG1D[:, :, 0]

    def append(self, keys_BG1D: torch.Tensor, values_BG1D: torch.Tensor) -> None:
        """One new position per row (at its length); the lengths move on."""
        self.write(self.keys, keys_BG1D)
        self.write(self.values, values_BG1D)
        self.lengths += 1
        self.filled += 1

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the positions a step reads, (B, G, span, D)."""
        return self.keys[:, :, : self.span], self.values[:, :, : self.span]

    def visible(self) -> torch.Tensor:
        """(B, span) bool: the positions each row's newest token may attend to."""
        return real_positions(self.lengths, self.span)
