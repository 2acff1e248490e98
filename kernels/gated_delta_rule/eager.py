"""The chunked gated delta rule in plain PyTorch: the eager reference and CPU path of the
`gated_delta_rule` op (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", ICLR 2025).

Per batch row and value head, with a state S of key_dim x value_dim (fla's layout: the paper's
S_t = S_{t-1} a_t (I - b_t k_t k_t^T) + b_t v_t k_t^T, transposed):

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,     a_t = exp(g_t)
    o_t = scale * S_t^T q_t

Value head j reads key/query head j // (value_heads / key_heads) (grouped value heads).

Chunked evaluation (the WY form of the paper). Inside a chunk of C positions starting from the
state S_0, with G_t = g_1 + ... + g_t, write each step's update as S_t = a_t S_{t-1} + k_t d_t^T
with d_t = b_t (v_t - a_t S_{t-1}^T k_t). Unrolled, S_t = e^{G_t} S_0 + sum_{s<=t}
e^{G_t - G_s} k_s d_s^T, so the rows d_t form D, the solution of a unit lower-triangular system:

    (I + diag(b) L) D = diag(b) (V - diag(e^G) K S_0),      L_ts = e^{G_t - G_s} k_t.k_s  (s < t)
    D   = U - W S_0,   U = T (b v),   W = T (b e^G k),   T = (I + diag(b) L)^-1
    O   = scale (diag(e^G) Q S_0 + (Q K^T * M) D),           M_ts = e^{G_t - G_s}  (s <= t)
    S_C = e^{G_C} S_0 + (e^{G_C - G} k)^T D

U, W and the masked scores Q K^T * M are computed for every chunk at once (T by a triangular
solve; `prepare_chunks`, shared with the Triton implementation); a loop over the chunks then
carries the state, three small matmuls per chunk.

Numerics: the math runs in float32 (float64 for float64 inputs). Every decay is the exp of G_t
or of a segment sum g_{s+1} + ... + g_t (s <= t), summed directly rather than as the difference
G_t - G_s, which cancels catastrophically once G is large; never of -G_s alone, so with g <= 0
(a log decay) no factor exceeds 1 however strong the decay over a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_hybrid.kernels.ssd.eager import segsum

DEFAULT_CHUNK_SIZE = 64  # fla's and Megatron-Core's


def check_gated_delta_rule_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    name: str = "gated_delta_rule",
) -> None:
    """Validate the op's arguments (every implementation shares them); raise ValueError naming
    the argument, its shape and the expected one."""

    def fail(arg: str, tensor: torch.Tensor, expected: str) -> None:
        raise ValueError(f"{name}: {arg} has shape {tuple(tensor.shape)}, expected {expected}")

    if q.dim() != 4:
        fail("q", q, "(batch, seqlen, key_heads, key_dim)")
    if k.shape != q.shape:
        fail("k", k, f"q's shape {tuple(q.shape)}")
    batch, seqlen, key_heads, key_dim = q.shape
    if v.dim() != 4 or v.shape[:2] != (batch, seqlen):
        fail(
            "v", v, f"(batch, seqlen, value_heads, value_dim) with batch, seqlen = {batch, seqlen}"
        )
    value_heads, value_dim = v.shape[2:]
    if key_heads == 0 or value_heads % key_heads:
        raise ValueError(
            f"{name}: value_heads ({value_heads}, from v {tuple(v.shape)}) must be a multiple of "
            f"key_heads ({key_heads}, from q {tuple(q.shape)})"
        )
    for arg, tensor in (("g", g), ("beta", beta)):
        if tensor.shape != (batch, seqlen, value_heads):
            fail(arg, tensor, f"(batch, seqlen, value_heads) = {(batch, seqlen, value_heads)}")
    state_shape = (batch, value_heads, key_dim, value_dim)
    if initial_state is not None and initial_state.shape != state_shape:
        fail(
            "initial_state",
            initial_state,
            f"(batch, value_heads, key_dim, value_dim) = {state_shape}",
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")


@dataclass(frozen=True)
class ChunkedRule:
    """The chunk-parallel operands of one call (module docstring), per batch row b, key head h,
    value head r of its group (value head h * group + r), chunk n and position t, s in it:

        U, W            (B, H, group, N, C, V), (B, H, group, N, C, K)
        scores          (B, H, group, N, C, C)   scale (Q K^T * M)
        q_decayed       (B, H, group, N, C, K)   scale e^{G_t} q_t
        k_to_end        (B, H, group, N, K, C)   (e^{G_C - G_s} k_s)^T
        chunk_decay     (B, H, group, N, 1, 1)   e^{G_C}
        initial_state   (B, H, group, K, V)      zeros when none was given

    in the compute dtype. Per chunk, from the state S entering it: D = U - W S, the outputs
    q_decayed S + scores D, and the state leaving it chunk_decay S + k_to_end D."""

    U: torch.Tensor
    W: torch.Tensor
    scores: torch.Tensor
    q_decayed: torch.Tensor
    k_to_end: torch.Tensor
    chunk_decay: torch.Tensor
    initial_state: torch.Tensor
    seqlen: int
    output_dtype: torch.dtype  # v's

    @property
    def nchunks(self) -> int:
        return self.U.shape[3]

    def sequence_output(self, o: torch.Tensor) -> torch.Tensor:
        """Per-chunk outputs (B, H, group, N, C, V) -> o (B, seqlen, value_heads, V) in v's
        dtype, the padding sliced off."""
        batch, key_heads, group, nchunks, chunk_size, value_dim = o.shape
        o = o.permute(0, 3, 4, 1, 2, 5)
        o = o.reshape(batch, nchunks * chunk_size, key_heads * group, value_dim)
        return o[:, : self.seqlen].to(self.output_dtype)

    @staticmethod
    def state_per_value_head(state: torch.Tensor) -> torch.Tensor:
        """A state (B, H, group, K, V) -> (B, value_heads, K, V)."""
        batch, key_heads, group, key_dim, value_dim = state.shape
        return state.reshape(batch, key_heads * group, key_dim, value_dim)


def prepare_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> ChunkedRule:
    """Everything of the chunked form that is parallel over chunks (`ChunkedRule`), for
    arguments already checked by `check_gated_delta_rule_args`; differentiable."""
    batch, seqlen, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    group = value_heads // key_heads
    dtype = torch.float32
    for tensor in (q, k, v, g, beta):
        dtype = torch.promote_types(dtype, tensor.dtype)
    scale = key_dim**-0.5 if scale is None else scale

    # Padded steps have g = b = 0 and k = v = q = 0: they keep the state (decay 1, no write) and
    # their outputs are sliced off.
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen

    def per_key_head(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B, H, 1, N, C, D)
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        x = x.reshape(batch, nchunks, chunk_size, key_heads, -1).permute(0, 3, 1, 2, 4)
        return x.unsqueeze(2)

    def per_value_head(x: torch.Tensor) -> torch.Tensor:  # (B, T, HV[, D]) -> (B, H, r, N, C[, D])
        x = x.to(dtype)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.reshape(batch, nchunks, chunk_size, key_heads, group, *x.shape[3:])
        return x.permute(0, 3, 4, 1, 2, *range(5, x.dim()))

    q_c, k_c = per_key_head(q) * scale, per_key_head(k)
    v_c, g_c, beta_c = per_value_head(v), per_value_head(g), per_value_head(beta)

    G = torch.cumsum(g_c, dim=-1)  # (B, H, r, N, C)
    # M_ts = e^{G_t - G_s} = e^{g_{s+1} + ... + g_t} for s <= t, 0 above the diagonal. Summed
    # by segsum, not as G_t - G_s: that difference of two large sums would lose the small
    # decays of recent steps to cancellation (float32 G of -1000 carries errors of 1e-4).
    decay_CC = torch.exp(segsum(g_c))
    decay_below_diagonal = decay_CC * (~torch.eye(chunk_size, dtype=torch.bool, device=q.device))

    # U and W of every chunk at once: one unit lower-triangular solve for [b v | b e^G k].
    system = torch.eye(chunk_size, dtype=dtype, device=q.device) + beta_c.unsqueeze(-1) * (
        (k_c @ k_c.transpose(-1, -2)) * decay_below_diagonal
    )
    rhs = torch.cat(
        [
            beta_c.unsqueeze(-1) * v_c,
            (beta_c * G.exp()).unsqueeze(-1) * k_c.expand(-1, -1, group, -1, -1, -1),
        ],
        dim=-1,
    )
    U, W = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split(
        [value_dim, key_dim], dim=-1
    )
    if initial_state is None:
        state = q.new_zeros((batch, key_heads, group, key_dim, value_dim), dtype=dtype)
    else:
        state = initial_state.to(dtype).reshape(batch, key_heads, group, key_dim, value_dim)
    return ChunkedRule(
        U=U,
        W=W,
        scores=(q_c @ k_c.transpose(-1, -2)) * decay_CC,
        q_decayed=q_c * G.exp().unsqueeze(-1),
        k_to_end=(k_c * decay_CC[..., -1, :].unsqueeze(-1)).transpose(-1, -2),  # e^{G_C - G_s}
        chunk_decay=G[..., -1].exp()[..., None, None],
        initial_state=state,
        seqlen=seqlen,
        output_dtype=v.dtype,
    )


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule (module docstring), fla's `chunk_gated_delta_rule` convention.

    Args:
        q, k: (batch, seqlen, key_heads, key_dim); normalize them first (the layer L2-normalizes
            them, as Gated DeltaNet does: the rule is stable for ||k|| <= 1 and b in [0, 1]).
        v: (batch, seqlen, value_heads, value_dim), value_heads a multiple of key_heads.
        g: (batch, seqlen, value_heads), the log of the decay, <= 0 (not checked).
        beta: (batch, seqlen, value_heads), the write strength.
        scale: the output scale; default key_dim ** -0.5.
        initial_state: optional (batch, value_heads, key_dim, value_dim) state before t = 0.
        output_final_state: also return the state after the last position.
        chunk_size: positions per chunk; seqlen need not be a multiple of it.

    Returns:
        (o, final_state): o (batch, seqlen, value_heads, value_dim) in v's dtype; final_state
        (batch, value_heads, key_dim, value_dim) in the compute dtype (float32, or float64 when
        any input is), or None without `output_final_state`. Differentiable in every tensor.

    Raises:
        ValueError: a tensor of the wrong shape (named with its shape), or a bad chunk_size.
    """
    check_gated_delta_rule_args(q, k, v, g, beta, initial_state, chunk_size)
    rule = prepare_chunks(q, k, v, g, beta, scale, initial_state, chunk_size)
    state = rule.initial_state
    outputs = []
    for n in range(rule.nchunks):
        d = rule.U[:, :, :, n] - rule.W[:, :, :, n] @ state  # (B, H, r, C, V)
        outputs.append(rule.q_decayed[:, :, :, n] @ state + rule.scores[:, :, :, n] @ d)
        state = rule.chunk_decay[:, :, :, n] * state + rule.k_to_end[:, :, :, n] @ d
    o = rule.sequence_output(torch.stack(outputs, dim=3))
    return o, rule.state_per_value_head(state) if output_final_state else None
