"""Mamba2 mixer (Megatron-LM's MambaMixer / Hugging Face's NemotronHMamba2Mixer math).

    [z, x, B, C, dt] = in_proj(u)                      packed, in this order
    x, B, C          = silu(causal_conv1d([x, B, C]))  depthwise over the packed channels
    dt               = clamp(softplus(dt + dt_bias), config.mamba_dt_limit)  (0, inf): none
    y                = SSD(x, dt, A = -exp(A_log), B, C) + D * x
    out              = out_proj(gated_rms_norm(y, z))  norm(y * silu(z)) per group

Shapes: H hidden, h = mamba_num_heads, P = mamba_head_dim, G = mamba_num_groups,
N = mamba_state_dim, d_inner = h * P.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_hybrid.config import ModelConfig
from megatron_hybrid.kernels.dtypes import at_least_float32
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.layers.norm import GatedRMSNorm


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, kernels: BoundKernels | None = None):
        super().__init__()
        self.kernels = kernels or eager_kernels()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.num_groups = config.mamba_num_groups
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

    def forward(self, u_BTH: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = u_BTH.shape
        group_state = self.num_groups * self.state_dim
        z, xBC, dt = self.in_proj(u_BTH).split(
            [self.d_inner, self.d_inner + 2 * group_state, self.num_heads], dim=-1
        )
        xBC = self.kernels.causal_conv1d(
            xBC, self.conv1d.weight, self.conv1d.bias, activation="silu"
        )
        x, B, C = xBC.split([self.d_inner, group_state, group_state], dim=-1)
        y = self.kernels.ssd(
            x.reshape(batch, seq, self.num_heads, self.head_dim),
            dt,
            -torch.exp(at_least_float32(self.A_log)),
            B.reshape(batch, seq, self.num_groups, self.state_dim),
            C.reshape(batch, seq, self.num_groups, self.state_dim),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
        )
        y = self.norm(y.reshape(batch, seq, self.d_inner), z)
        return self.out_proj(y)
