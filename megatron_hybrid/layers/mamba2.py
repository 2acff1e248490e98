"""Mamba2 mixer (Megatron-LM's MambaMixer / Hugging Face's NemotronHMamba2Mixer math).

    [z, x, B, C, dt] = in_proj(u)                      packed, in this order
    x, B, C          = silu(causal_conv1d([x, B, C]))  depthwise over the packed channels
    dt               = clamp(softplus(dt + dt_bias), config.mamba_dt_limit)  (0, inf): none
    y                = SSD(x, dt, A = -exp(A_log), B, C) + D * x
    out              = out_proj(gated_rms_norm(y, z))  norm(y * silu(z)) per group

Shapes: H hidden, h = mamba_num_heads, P = mamba_head_dim, G = mamba_num_groups,
N = mamba_state_dim, d_inner = h * P.

The forward reads how many heads it holds off its weights (one A_log per head), so it runs
unchanged on a tensor-parallel rank's slice of the heads and groups (megatron_hybrid/specs/
mamba2.py declares the split); `num_heads`, `num_groups` and `d_inner` are the sizes the layer
was built with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from megatron_hybrid.kernels.dtypes import at_least_float32
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.norm import GatedRMSNorm

if TYPE_CHECKING:
    from megatron_hybrid.config import ModelConfig


class InProjParts(NamedTuple):
    """Output sizes of in_proj's packed parts, in order; `conv` are the conv1d's [x, B, C]."""

    z: int
    x: int
    B: int
    C: int
    dt: int

    @property
    def conv(self) -> tuple[int, int, int]:
        return (self.x, self.B, self.C)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        self.kernels = kernels or eager_kernels()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.num_groups = config.mamba_num_groups
        self.heads_per_group = self.num_heads // self.num_groups
        self.state_dim = config.mamba_state_dim
        self.chunk_size = config.mamba_chunk_size
        self.d_inner = config.mamba_d_inner
        # Megatron does not clamp dt; Hugging Face's nemotron_h does (imports keep its clamp).
        self.dt_limit = config.mamba_dt_limit
        conv_dim = config.mamba_conv_dim
        self.in_proj = nn.Linear(config.hidden_size, config.mamba_in_proj_dim, bias=False)
        # Holds conv1d.weight (conv_dim, 1, K) and conv1d.bias, the layout of nn.Conv1d that
        # Megatron and Hugging Face checkpoints use; the math runs in the bound causal_conv1d.
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, config.mamba_conv_kernel, groups=conv_dim, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(
            self.d_inner, self.d_inner // self.num_groups, config.layernorm_epsilon, self.kernels
        )
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)

    def in_proj_parts(self, num_heads: int | None = None) -> InProjParts:
        """The packed sizes for `num_heads` heads (default: all the layer's heads), with the
        B/C groups that go with them."""
        heads = self.num_heads if num_heads is None else num_heads
        d_inner = heads * self.head_dim
        group_state = heads // self.heads_per_group * self.state_dim
        return InProjParts(d_inner, d_inner, group_state, group_state, heads)

    def forward(self, u_BTH: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = u_BTH.shape
        parts = self.in_proj_parts(self.A_log.shape[0])  # the heads this module holds
        z, xBC, dt = self.in_proj(u_BTH).split([parts.z, sum(parts.conv), parts.dt], dim=-1)
        xBC = self.kernels.causal_conv1d(
            xBC, self.conv1d.weight, self.conv1d.bias, activation="silu"
        )
        x, B, C = xBC.split(parts.conv, dim=-1)
        y = self.kernels.ssd(
            x.reshape(batch, seq, -1, self.head_dim),
            dt,
            -torch.exp(at_least_float32(self.A_log)),
            B.reshape(batch, seq, -1, self.state_dim),
            C.reshape(batch, seq, -1, self.state_dim),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
        )
        y = self.norm(y.reshape(batch, seq, parts.z), z)
        return self.out_proj(y)
