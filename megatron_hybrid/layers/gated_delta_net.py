"""Gated DeltaNet mixer (Megatron-Core's GatedDeltaNet, as in Qwen3-Next's linear-attention layers).

    [q, k, v, z, b, a] = in_proj(u)                     packed, in this order
    q, k, v            = silu(causal_conv1d([q, k, v]))  depthwise over the packed channels
    q, k               = l2_normalize(q), l2_normalize(k)  per key head
    g                  = -exp(A_log) * softplus(a + dt_bias)  log decay per value head (float32)
    beta               = sigmoid(b)
    o                  = gated_delta_rule(q, k, v, g, beta)  scale 1 / sqrt(key_dim)
    out                = out_proj(rms_norm(o) * silu(z))  norm per value head, then the gate

Shapes: H hidden, nk = linear_num_key_heads of linear_key_head_dim (q and k), nv =
linear_num_value_heads of linear_value_head_dim (v, the gate z, and one b, a, dt_bias, A_log
each); value head j reads key head j // (nv / nk). The conv has no bias, the linears none, the
output norm one weight of linear_value_head_dim that every value head shares: Megatron-Core's
layer as its hybrid models build it.

Decoding (megatron_hybrid/layers/decoding.py): `prefill` keeps the conv's last K-1 inputs and
the rule's final state (`GatedDeltaNetState`); padding steps get g = 0 and beta = 0, which keep
the state (decay 1, no write). `step` advances the conv window with `causal_conv1d_step` and the
state with the `gated_delta_rule` op over one position from it.

The forward reads how many value heads it holds off its weights (one A_log per value head), so
it runs unchanged on a tensor-parallel rank's slice of the heads (megatron_hybrid/specs/
gated_delta_net.py declares the split); the sizes below are those it was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hybrid.kernels.dtypes import at_least_float32
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.decoding import conv_window, real_positions
from megatron_hybrid.layers.norm import RMSNorm

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig

# fla's l2norm, which Megatron-Core applies to q and k: x / sqrt(sum(x^2) + eps).
L2_NORM_EPS = 1e-6


class InProjParts(NamedTuple):
    """Output sizes of in_proj's packed parts, in order; `conv` are the conv1d's [q, k, v]."""

    q: int
    k: int
    v: int
    z: int
    beta: int
    alpha: int

    @property
    def conv(self) -> tuple[int, int, int]:
        return (self.q, self.k, self.v)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dim, computed in float32; returns x's dtype."""
    x_f = at_least_float32(x)
    return (x_f * torch.rsqrt(x_f.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)).to(x.dtype)


@dataclass
class GatedDeltaNetState:
    """What a Gated DeltaNet layer carries from one token to the next, per row: `conv` (batch,
    conv channels, K-1), the conv's last K-1 inputs, oldest first; `recurrent` (batch, value
    heads, key_dim, value_dim), the delta rule's state in float32."""

    conv: torch.Tensor
    recurrent: torch.Tensor


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        self.kernels = kernels or eager_kernels()
        self.key_head_dim = config.linear_key_head_dim
        self.value_head_dim = config.linear_value_head_dim
        self.num_key_heads = config.linear_num_key_heads
        self.num_value_heads = config.linear_num_value_heads
        self.value_heads_per_key_head = self.num_value_heads // self.num_key_heads
        parts = self.in_proj_parts()
        self.in_proj = nn.Linear(config.hidden_size, sum(parts), bias=False)
        # conv1d.weight (conv_dim, 1, K), nn.Conv1d's layout as in Megatron's checkpoints; the
        # math runs in the bound causal_conv1d.
        conv_dim = sum(parts.conv)
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, config.linear_conv_kernel_dim, groups=conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_value_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_value_heads))
        self.out_norm = RMSNorm(self.value_head_dim, config.layernorm_epsilon, self.kernels)
        self.out_proj = nn.Linear(parts.v, config.hidden_size, bias=False)

    def in_proj_parts(self, num_value_heads: int | None = None) -> InProjParts:
        """The packed sizes for `num_value_heads` value heads (default: all the layer's), with
        the key heads that serve them."""
        value_heads = self.num_value_heads if num_value_heads is None else num_value_heads
        key_heads = value_heads // self.value_heads_per_key_head
        qk, v = key_heads * self.key_head_dim, value_heads * self.value_head_dim
        return InProjParts(qk, qk, v, v, value_heads, value_heads)

    def forward(self, u_BTH: torch.Tensor) -> torch.Tensor:
        parts, qkv, z, b, a = self.project(u_BTH)
        qkv = self.kernels.causal_conv1d(qkv, self.conv1d.weight, None, activation="silu")
        o, _ = self.kernels.gated_delta_rule(*self.rule_inputs(qkv, b, a, parts))
        return self.output(o, z, parts)

    def project(self, u_BTH: torch.Tensor):
        """in_proj's packed parts: (sizes, the conv's input [q, k, v], z, b, a)."""
        parts = self.in_proj_parts(self.A_log.shape[0])  # the value heads this module holds
        qkv, z, b, a = self.in_proj(u_BTH).split(
            [sum(parts.conv), parts.z, parts.beta, parts.alpha], dim=-1
        )
        return parts, qkv, z, b, a

    def rule_inputs(self, qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, parts):
        """(q, k, v, g, beta) of the gated delta rule from the conv's output and b, a."""
        batch, seq, _ = qkv.shape
        q, k, v = qkv.split(parts.conv, dim=-1)
        q = l2_normalize(q.reshape(batch, seq, -1, self.key_head_dim))
        k = l2_normalize(k.reshape(batch, seq, -1, self.key_head_dim))
        v = v.reshape(batch, seq, -1, self.value_head_dim)
        A_log, dt_bias = at_least_float32(self.A_log), at_least_float32(self.dt_bias)
        g = -A_log.exp() * F.softplus(at_least_float32(a) + dt_bias)
        beta = torch.sigmoid(at_least_float32(b))
        return q, k, v, g, beta

    def output(self, o: torch.Tensor, z: torch.Tensor, parts) -> torch.Tensor:
        batch, seq = z.shape[:2]
        gate = F.silu(at_least_float32(z.reshape(batch, seq, -1, self.value_head_dim)))
        y = (self.out_norm(o) * gate).to(o.dtype)
        return self.out_proj(y.reshape(batch, seq, parts.v))

    # -- decoding (megatron_hybrid/layers/decoding.py) ------------------------------------------
    def prefill(
        self, u_BTH: torch.Tensor, lengths_B: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, GatedDeltaNetState]:
        """The forward over right-padded prompts, and each row's state after its last real
        position (padding steps get g = 0 and beta = 0: decay 1, no write). `capacity` is not
        needed: the state's size does not grow with the context."""
        parts, qkv, z, b, a = self.project(u_BTH)
        window = conv_window(qkv, lengths_B, self.conv1d.weight.shape[-1] - 1)
        qkv = self.kernels.causal_conv1d(qkv, self.conv1d.weight, None, activation="silu")
        q, k, v, g, beta = self.rule_inputs(qkv, b, a, parts)
        real = real_positions(lengths_B, u_BTH.shape[1]).unsqueeze(-1)
        o, final = self.kernels.gated_delta_rule(
            q, k, v, g * real, beta * real, output_final_state=True
        )
        return self.output(o, z, parts), GatedDeltaNetState(window, final)

    def step(self, u_B1H: torch.Tensor, state: GatedDeltaNetState) -> torch.Tensor:
        """One new token per row; `state` advances in place."""
        parts, qkv, z, b, a = self.project(u_B1H)
        qkv = self.kernels.causal_conv1d_step(
            qkv[:, 0], state.conv, self.conv1d.weight, None, activation="silu"
        )
        o, final = self.kernels.gated_delta_rule(
            *self.rule_inputs(qkv.unsqueeze(1), b, a, parts),
            initial_state=state.recurrent,
            output_final_state=True,
        )
        state.recurrent.copy_(final)
        return self.output(o, z, parts)
