"""Gated DeltaNet written out from the paper's equations, in float64, one token at a time: the
reference the chunked kernel (kernels/gated_delta_rule/) and the layer
(megatron_hybrid/layers/gated_delta_net.py) are tested against. Nothing here is shared with
the code under test; `inputs` draws the operands the kernel tests share.

Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025),
eq. (10), with the state S_t of value_dim x key_dim:

    S_t = S_{t-1} a_t (I - b_t k_t k_t^T) + b_t v_t k_t^T,      o_t = S_t q_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_delta_recurrence(q, k, v, g, beta, scale, initial_state=None):
    """o (B, T, HV, V) and the final state (B, HV, K, V), float64. q, k (B, T, H, K); v
    (B, T, HV, V); g, beta (B, T, HV); value head j reads key head j // (HV // H);
    `initial_state` in the kernels' (B, HV, K, V) layout, i.e. S_0 transposed."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    batch, seqlen, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    group = value_heads // key_heads
    eye = torch.eye(key_dim, dtype=torch.float64)
    outputs = []
    for b in range(batch):
        per_head = []
        for j in range(value_heads):
            i = j // group
            S = (
                torch.zeros(value_dim, key_dim, dtype=torch.float64)
                if initial_state is None
                else initial_state[b, j].double().T
            )
            o = []
            for t in range(seqlen):
                k_t, v_t, a_t, b_t = k[b, t, i], v[b, t, j], g[b, t, j].exp(), beta[b, t, j]
                S = S @ (a_t * (eye - b_t * torch.outer(k_t, k_t))) + b_t * torch.outer(v_t, k_t)
                o.append(scale * (S @ q[b, t, i]))
            per_head.append((torch.stack(o), S.T))
        outputs.append(per_head)
    o = torch.stack([torch.stack([o for o, _ in row], dim=1) for row in outputs])
    final = torch.stack([torch.stack([s for _, s in row]) for row in outputs])
    return o, final


def l2_normalize(x, eps=1e-6):
    """fla's l2norm, which Megatron-Core applies to q and k: x / sqrt(sum x^2 + eps)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def inputs(batch, seqlen, key_heads, value_heads, key_dim, value_dim, seed=0, strong_decay=False):
    """Random operands as a Gated DeltaNet layer produces them: L2-normalized q and k, b in
    (0, 1), log decays g < 0 (down to about -4 per step; with `strong_decay` some of -60)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = l2_normalize(randn(batch, seqlen, key_heads, key_dim))
    k = l2_normalize(randn(batch, seqlen, key_heads, key_dim))
    v = randn(batch, seqlen, value_heads, value_dim)
    g = -torch.exp(randn(batch, seqlen, value_heads) - 1.0).clamp(max=4.0)
    if strong_decay:
        g = torch.where(randn(batch, seqlen, value_heads) > 1.0, torch.full_like(g, -60.0), g)
    beta = torch.sigmoid(randn(batch, seqlen, value_heads))
    return q, k, v, g, beta


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def gated_delta_net_layer(x, params, sizes, eps):
    """Megatron-Core's GatedDeltaNet forward in float64 from its parts: `params` by Megatron's
    names (in_proj.weight, conv1d.weight, dt_bias, A_log, out_norm.weight, out_proj.weight),
    `sizes` = (key_heads, key_dim, value_heads, value_dim)."""
    p = {name: t.double() for name, t in params.items()}
    x = x.double()
    batch, seqlen, _ = x.shape
    nk, dk, nv, dv = sizes
    qkvzba = x @ p["in_proj.weight"].T  # packed [q, k, v, z, beta, alpha]
    qkv, z, b, a = qkvzba.split([2 * nk * dk + nv * dv, nv * dv, nv, nv], dim=-1)
    # Depthwise causal conv over time: output t sees inputs t-K+1 .. t, then SiLU.
    weight = p["conv1d.weight"][:, 0]  # (channels, K)
    width = weight.shape[1]
    padded = F.pad(qkv, (0, 0, width - 1, 0))
    conv = sum(weight[:, i] * padded[:, i : i + seqlen] for i in range(width))
    qkv = F.silu(conv)
    q, k, v = qkv.split([nk * dk, nk * dk, nv * dv], dim=-1)
    q = l2_normalize(q.reshape(batch, seqlen, nk, dk))
    k = l2_normalize(k.reshape(batch, seqlen, nk, dk))
    v = v.reshape(batch, seqlen, nv, dv)
    g = -p["A_log"].exp() * F.softplus(a + p["dt_bias"])
    o, _ = gated_delta_recurrence(q, k, v, g, torch.sigmoid(b), dk**-0.5)
    y = rms_norm(o, p["out_norm.weight"], eps) * F.silu(z.reshape(batch, seqlen, nv, dv))
    return y.reshape(batch, seqlen, nv * dv) @ p["out_proj.weight"].T
