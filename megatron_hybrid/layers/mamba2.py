"""Mamba2 mixer (Megatron-LM's MambaMixer / Hugging Face's NemotronHMamba2Mixer math).

    [z, x, B, C, dt] = in_proj(u)                      packed, in this order
    x, B, C          = silu(causal_conv1d([x, B, C]))  depthwise over the packed channels
    dt               = clamp(softplus(dt + dt_bias), config.mamba_dt_limit)  (0, inf): none
    y                = SSD(x, dt, A = -exp(A_log), B, C) + D * x
    out              = out_proj(gated_rms_norm(y, z))  norm(y * silu(z)) per group

Shapes: H hidden, h = mamba_num_heads, P = mamba_head_dim, G = mamba_num_groups,
N = mamba_state_dim, d_inner = h * P.

Decoding (megatron_hybrid/layers/decoding.py): `prefill` runs the chunked pass and keeps the
state after each prompt (`Mamba2State`: the conv's last K-1 inputs and the SSM state), `step`
advances both by one token with the `causal_conv1d_step` and `ssd_step` kernels.

The forward reads how many heads it holds off its weights (one A_log per head), so it runs
unchanged on a tensor-parallel rank's slice of the heads and groups (megatron_hybrid/specs/
mamba2.py declares the split); `num_heads`, `num_groups` and `d_inner` are the sizes the layer
was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from megatron_hybrid.kernels.dtypes import at_least_float32
from megatron_hybrid.kernels.registry import BoundKernels, eager_kernels
from megatron_hybrid.kernels.ssd.eager import process_dt
from megatron_hybrid.layers.decoding import conv_window, real_positions
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


@dataclass
class Mamba2State:
    """What a Mamba2 layer carries from one token to the next, per row: `conv` (batch, conv
    channels, K-1), the conv's last K-1 inputs, oldest first; `ssm` (batch, heads, head_dim,
    state_dim), the SSM state in float32."""

    conv: torch.Tensor
    ssm: torch.Tensor


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
        parts, z, xBC, dt = self.project(u_BTH)
        x, B, C = self.conv(xBC).split(parts.conv, dim=-1)
        y = self.kernels.ssd(
            x.reshape(batch, seq, -1, self.head_dim),
            dt,
            self.A(),
            B.reshape(batch, seq, -1, self.state_dim),
            C.reshape(batch, seq, -1, self.state_dim),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
        )
        return self.output(y, z)

    def project(self, u_BTH: torch.Tensor):
        """in_proj's packed parts: (sizes, z, the conv's input [x, B, C], dt)."""
        parts = self.in_proj_parts(self.A_log.shape[0])  # the heads this module holds
        z, xBC, dt = self.in_proj(u_BTH).split([parts.z, sum(parts.conv), parts.dt], dim=-1)
        return parts, z, xBC, dt

    def conv(self, xBC: torch.Tensor) -> torch.Tensor:
        return self.kernels.causal_conv1d(
            xBC, self.conv1d.weight, self.conv1d.bias, activation="silu"
        )

    def A(self) -> torch.Tensor:
        return -torch.exp(at_least_float32(self.A_log))

    def output(self, y: torch.Tensor, z_BTX: torch.Tensor) -> torch.Tensor:
        """out_proj(norm(y, z)) with y's heads flattened back to z's width."""
        return self.out_proj(self.norm(y.reshape(z_BTX.shape), z_BTX))

    # -- decoding (megatron_hybrid/layers/decoding.py) ------------------------------------------
    def prefill(
        self, u_BTH: torch.Tensor, lengths_B: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, Mamba2State]:
        """The forward over right-padded prompts, and each row's state after its last real
        position. The padding's steps get dt = 0 (decay 1, no input), so the chunked scan's final
        state is the state at each row's end. (`capacity` is not needed: the state's size does
        not grow with the context.)"""
        batch, seq, _ = u_BTH.shape
        parts, z, xBC, dt = self.project(u_BTH)
        window = conv_window(xBC, lengths_B, self.conv1d.weight.shape[-1] - 1)
        x, B, C = self.conv(xBC).split(parts.conv, dim=-1)
        # dt as the scan would process it, then zero on the padding.
        dt = process_dt(dt, self.dt_bias, True, self.dt_limit, at_least_float32(dt).dtype)
        dt = dt * real_positions(lengths_B, seq).unsqueeze(-1)
        y, ssm = self.kernels.ssd(
            x.reshape(batch, seq, -1, self.head_dim),
            dt,
            self.A(),
            B.reshape(batch, seq, -1, self.state_dim),
            C.reshape(batch, seq, -1, self.state_dim),
            self.chunk_size,
            D=self.D,
            return_final_states=True,
        )
        return self.output(y, z), Mamba2State(window, ssm)

    def step(self, u_B1H: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One new token per row; `state` advances in place."""
        batch = u_B1H.shape[0]
        parts, z, xBC, dt = self.project(u_B1H)
        xBC = self.kernels.causal_conv1d_step(
            xBC[:, 0], state.conv, self.conv1d.weight, self.conv1d.bias, activation="silu"
        )
        x, B, C = xBC.split(parts.conv, dim=-1)
        y = self.kernels.ssd_step(
            state.ssm,
            x.reshape(batch, -1, self.head_dim),
            dt[:, 0],
            self.A(),
            B.reshape(batch, -1, self.state_dim),
            C.reshape(batch, -1, self.state_dim),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
        )
        return self.output(y, z)
