"""Triton kernels of the SSD chunked scan's forward pass (Mamba2; the math and the launchers are
in kernels/ssd/triton.py, the eager reference in kernels/ssd/eager.py).

Layouts. User tensors keep their own strides: x (b, l, h, p), dt (b, l, h), B and C (b, l, g, n),
y (b, l, h, p). Intermediates are contiguous float32:
    dt_out, dA_cs   (b, h, nchunks * chunk)   processed dt and the in-chunk cumsum of dt * A
    CB              (b, nchunks, g, CP, CP)   C_l . B_s per chunk (tiles with s > l unwritten)
    states          (b, nchunks, h, p, n)     a chunk's own end state, then (after state
                                              passing, in place) the state entering the chunk
A chunk's positions i run over a power-of-two CP >= chunk_size (tl.arange and tl.dot need powers
of two >= 16); i >= chunk_size or c * chunk_size + i >= seqlen are masked: dt 0 (decay 1, no
input), x = B = C = 0.

Matmuls go through `mm`: operands rounded to DOT_DTYPE (the inputs' half dtype, or float32),
float32 accumulation. Under TRITON_INTERPRET the operands are rounded and then multiplied in
float32, because the interpreter's half-precision tl.dot is wrong (triton 3.9).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b in float32 from operands rounded to DOT_DTYPE (float32: IEEE products, no TF32)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif INTERPRET:
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32))
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def softplus(v):
    """log(1 + exp(v)) as torch's F.softplus (identity above 20), with log1p accuracy for very
    negative v (where 1 + exp(v) rounds to 1)."""
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(v > 20.0, v, log1p)


@triton.jit
def chunk_positions(c, i0, chunk_size, seqlen, BLOCK: tl.constexpr):
    """Indices i0 + [0, BLOCK) inside chunk c, their time steps, and which are real steps."""
    i = i0 + tl.arange(0, BLOCK)
    t = c * chunk_size + i
    in_chunk = i < chunk_size
    return i, t, in_chunk, in_chunk & (t < seqlen)


@triton.jit
def causal_decay(da_l, da_s, causal):
    """exp(da_l - da_s) where `causal`, else 0 (never overflowing off the causal entries)."""
    return tl.exp(tl.where(causal, da_l[:, None] - da_s[None, :], -float("inf")))


@triton.jit
def chunk_cumsum_kernel(
    DT,
    A,
    DT_BIAS,
    DT_OUT,
    DA_CS,
    seqlen,
    nheads,
    chunk_size,
    padded_len,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    dt_min,
    dt_max,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (batch, chunk, head block): dt -> dt + dt_bias -> softplus -> clamp, zero on
    padded steps, and the inclusive cumsum of dt * A over the chunk."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < nheads
    i, t, in_chunk, valid = chunk_positions(c, 0, chunk_size, seqlen, CP)
    mask = valid[:, None] & h_ok[None, :]
    dt = tl.load(
        DT + b * stride_dt_b + t.to(tl.int64)[:, None] * stride_dt_l + h[None, :] * stride_dt_h,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(DT_BIAS + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        dt = softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask, dt, 0.0)
    a = tl.load(A + h, mask=h_ok, other=0.0).to(tl.float32)
    da_cs = tl.cumsum(dt * a[None, :], axis=0)
    out = (b * nheads + h[None, :]) * padded_len + t[:, None]
    store_mask = in_chunk[:, None] & h_ok[None, :]
    tl.store(DT_OUT + out, dt, mask=store_mask)
    tl.store(DA_CS + out, da_cs, mask=store_mask)


@triton.jit
def bmm_cb_kernel(
    B,
    C,
    CB,
    seqlen,
    chunk_size,
    nchunks,
    ngroups,
    dstate,
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    CP: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (batch*chunk*group, target tile): CB[l, s] = C_l . B_s for the source tiles up to
    and including the diagonal one."""
    pid = tl.program_id(0)
    g = pid % ngroups
    c = (pid // ngroups) % nchunks
    b = (pid // (ngroups * nchunks)).to(tl.int64)
    lt = tl.program_id(1)
    n = tl.arange(0, BN)
    n_ok = n < dstate
    i_l, t_l, _, valid_l = chunk_positions(c, lt * BT, chunk_size, seqlen, BT)
    c_l = tl.load(
        C
        + b * stride_c_b
        + t_l.to(tl.int64)[:, None] * stride_c_l
        + g * stride_c_g
        + n[None, :] * stride_c_n,
        mask=valid_l[:, None] & n_ok[None, :],
        other=0.0,
    )
    out = CB + ((b * nchunks + c) * ngroups + g) * CP * CP + i_l[:, None] * CP
    for st in range(0, lt + 1):
        i_s, t_s, _, valid_s = chunk_positions(c, st * BT, chunk_size, seqlen, BT)
        b_s = tl.load(
            B
            + b * stride_b_b
            + t_s.to(tl.int64)[None, :] * stride_b_l
            + g * stride_b_g
            + n[:, None] * stride_b_n,
            mask=valid_s[None, :] & n_ok[:, None],
            other=0.0,
        )  # (BN, BT): B_s^T
        tl.store(out + i_s[None, :], mm(c_l, b_s, DOT_DTYPE, INTERPRET))


@triton.jit
def chunk_state_kernel(
    X,
    Y,
    DT,
    DA_CS,
    OUT,
    seqlen,
    chunk_size,
    nchunks,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    padded_len,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_y_b,
    stride_y_l,
    stride_y_g,
    stride_y_n,
    TO_END: tl.constexpr,
    CP: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (batch*chunk*head): OUT[b, c, h] = sum_i w_i * outer(X[i, h], Y[i, group(h)])
    over the chunk's steps i, (p, n) in float32, with

        TO_END:     w_i = exp(dA_cs[last] - dA_cs[i]) * dt_i   (X = x, Y = B: the state the chunk
                    leaves behind when it starts from zero)
        not TO_END: w_i = exp(dA_cs[i])                       (X = dy, Y = C: the gradient of
                    the state entering the chunk, from the chunk's outputs)
    """
    pid = tl.program_id(0)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = (pid // (nheads * nchunks)).to(tl.int64)
    g = h // heads_per_group
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    p_ok = p < headdim
    n_ok = n < dstate
    row = (b * nheads + h) * padded_len + c * chunk_size
    if TO_END:
        da_last = tl.load(DA_CS + row + chunk_size - 1)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for k0 in range(0, chunk_size, BK):
        i, t, in_chunk, valid = chunk_positions(c, k0, chunk_size, seqlen, BK)
        t64 = t.to(tl.int64)
        x_t = tl.load(
            X
            + b * stride_x_b
            + t64[None, :] * stride_x_l
            + h * stride_x_h
            + p[:, None] * stride_x_p,
            mask=valid[None, :] & p_ok[:, None],
            other=0.0,
        )  # (BP, BK)
        y = tl.load(
            Y
            + b * stride_y_b
            + t64[:, None] * stride_y_l
            + g * stride_y_g
            + n[None, :] * stride_y_n,
            mask=valid[:, None] & n_ok[None, :],
            other=0.0,
        )
        da = tl.load(DA_CS + row + i, mask=in_chunk, other=0.0)
        if TO_END:
            w = tl.exp(da_last - da) * tl.load(DT + row + i, mask=in_chunk, other=0.0)
        else:
            w = tl.exp(da)
        w = tl.where(valid, w, 0.0)
        acc += mm(x_t, y * w[:, None], DOT_DTYPE, INTERPRET)
    out = OUT + (pid.to(tl.int64) * headdim + p[:, None]) * dstate + n[None, :]
    tl.store(out, acc, mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def state_passing_fwd_kernel(
    STATES,
    DA_CS,
    INIT,
    FINAL,
    nchunks,
    nheads,
    chunk_size,
    padded_len,
    dim,
    HAS_INIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (batch*head, block of the p*n state): walks the chunks in order, replacing each
    chunk's own end state by the state entering it, S_{c+1} = exp(dA_cs[c, last]) S_c + T_c, and
    writes the final state."""
    pid = tl.program_id(0)
    h = pid % nheads
    b = (pid // nheads).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < dim
    if HAS_INIT:
        state = tl.load(INIT + pid.to(tl.int64) * dim + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    da_last = DA_CS + (b * nheads + h) * padded_len + chunk_size - 1
    # Chunk c + 1's loads are issued before chunk c's store, so one is always in flight (the
    # last chunk loads itself again: c + 1 - (c + 1) // nchunks stays in range, no mask).
    base = STATES + (b * nchunks * nheads + h) * dim + offs
    step = nheads * dim
    own = tl.load(base, mask=ok, other=0.0)
    decay = tl.exp(tl.load(da_last))
    for c in range(0, nchunks):
        c_next = c + 1 - (c + 1) // nchunks
        own_next = tl.load(base + c_next * step, mask=ok, other=0.0)
        decay_next = tl.exp(tl.load(da_last + c_next * chunk_size))
        tl.store(base + c * step, state, mask=ok)
        state = decay * state + own
        own, decay = own_next, decay_next
    tl.store(FINAL + pid.to(tl.int64) * dim + offs, state, mask=ok)


@triton.jit
def chunk_scan_fwd_kernel(
    X,
    C,
    CB,
    DT,
    DA_CS,
    STATES,
    D,
    Y,
    seqlen,
    chunk_size,
    nchunks,
    nheads,
    heads_per_group,
    ngroups,
    headdim,
    dstate,
    padded_len,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_y_b,
    stride_y_l,
    stride_y_h,
    HAS_D: tl.constexpr,
    D_PER_CHANNEL: tl.constexpr,
    CP: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (batch*chunk*head, target tile l):
        y_l = exp(dA_cs_l) C_l . S_c + sum_{s <= l} CB[l, s] exp(dA_cs_l - dA_cs_s) dt_s x_s
              + D x_l
    with S_c the state entering the chunk."""
    pid = tl.program_id(0)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = (pid // (nheads * nchunks)).to(tl.int64)
    g = h // heads_per_group
    lt = tl.program_id(1)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    p_ok = p < headdim
    n_ok = n < dstate
    row = (b * nheads + h) * padded_len + c * chunk_size
    i_l, t_l, in_l, valid_l = chunk_positions(c, lt * BT, chunk_size, seqlen, BT)
    da_l = tl.load(DA_CS + row + i_l, mask=in_l, other=0.0)
    c_l = tl.load(
        C
        + b * stride_c_b
        + t_l.to(tl.int64)[:, None] * stride_c_l
        + g * stride_c_g
        + n[None, :] * stride_c_n,
        mask=valid_l[:, None] & n_ok[None, :],
        other=0.0,
    )
    state_t = tl.load(
        STATES + (pid.to(tl.int64) * headdim + p[None, :]) * dstate + n[:, None],
        mask=p_ok[None, :] & n_ok[:, None],
        other=0.0,
    )  # (BN, BP): S_c^T
    acc = mm(c_l, state_t, DOT_DTYPE, INTERPRET) * tl.exp(da_l)[:, None]
    cb_rows = CB + ((b * nchunks + c) * ngroups + g) * CP * CP + i_l[:, None] * CP
    x_base = X + b * stride_x_b + h * stride_x_h
    for st in range(0, lt + 1):
        i_s, t_s, in_s, valid_s = chunk_positions(c, st * BT, chunk_size, seqlen, BT)
        da_s = tl.load(DA_CS + row + i_s, mask=in_s, other=0.0)
        dt_s = tl.load(DT + row + i_s, mask=in_s, other=0.0)
        causal = (i_l[:, None] >= i_s[None, :]) & valid_s[None, :]
        cb = tl.where(causal, tl.load(cb_rows + i_s[None, :]), 0.0)
        scores = cb * causal_decay(da_l, da_s, causal) * dt_s[None, :]
        x_s = tl.load(
            x_base + t_s.to(tl.int64)[:, None] * stride_x_l + p[None, :] * stride_x_p,
            mask=valid_s[:, None] & p_ok[None, :],
            other=0.0,
        )
        acc += mm(scores, x_s, DOT_DTYPE, INTERPRET)
    mask_l = valid_l[:, None] & p_ok[None, :]
    if HAS_D:
        x_l = tl.load(
            x_base + t_l.to(tl.int64)[:, None] * stride_x_l + p[None, :] * stride_x_p,
            mask=mask_l,
            other=0.0,
        ).to(tl.float32)
        if D_PER_CHANNEL:
            d = tl.load(D + h * headdim + p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        else:
            d = tl.load(D + h).to(tl.float32)
        acc += d * x_l
    out = Y + b * stride_y_b + t_l.to(tl.int64)[:, None] * stride_y_l + h * stride_y_h + p[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=mask_l)
