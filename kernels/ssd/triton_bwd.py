"""Triton kernels of the SSD chunked scan's backward pass. The gradient formulas, what each kernel
writes and how the pieces are summed are in kernels/ssd/triton.py; layouts and helpers are those of
kernels/ssd/triton_fwd.py. Notation per (batch, chunk, head): a = dA_cs (in-chunk cumsum of
dt * A), S the state entering the chunk, dT the gradient of the chunk's own end state,
G[l, s] = dy_l . x_s, decay[l, s] = exp(a_l - a_s) for s <= l (else 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_hybrid.kernels.ssd.triton_fwd import causal_decay, chunk_positions, mm, softplus


@triton.jit
def state_passing_bwd_kernel(
    DSTATES,
    STATES,
    DA_CS,
    DFINAL,
    DINIT,
    DDA_LAST,
    nchunks,
    nheads,
    chunk_size,
    padded_len,
    dim,
    BLOCK: tl.constexpr,
):
    """Program (batch*head, block of the p*n state): walks the chunks backwards with
    dS_c = exp(a_last) dS_{c+1} + (the chunk's own readout gradient, DSTATES[c] on entry).
    DSTATES[c] is replaced by dT_c = dS_{c+1}; DDA_LAST[b, h, c, block] gets this block's part of
    exp(a_last) <S_c, dS_{c+1}>; DINIT gets dS_0."""
    pid = tl.program_id(0)
    h = pid % nheads
    b = (pid // nheads).to(tl.int64)
    block = tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ok = offs < dim
    dstate = tl.load(DFINAL + pid.to(tl.int64) * dim + offs, mask=ok, other=0.0)
    da_last = DA_CS + (b * nheads + h) * padded_len + chunk_size - 1
    dda = DDA_LAST + (b * nheads + h) * nchunks * tl.num_programs(1) + block
    # Chunk c - 1's loads are issued before chunk c's stores, so they are always in flight
    # (chunk 0 loads itself again: c - 1 + 1 // (c + 1) stays in range, no mask).
    step = nheads * dim
    base = (b * nchunks * nheads + h) * dim + offs
    last = base + (nchunks - 1) * step
    own = tl.load(DSTATES + last, mask=ok, other=0.0)
    state = tl.load(STATES + last, mask=ok, other=0.0)
    decay = tl.exp(tl.load(da_last + (nchunks - 1) * chunk_size))
    for j in range(0, nchunks):
        c = nchunks - 1 - j
        c_prev = c - 1 + 1 // (c + 1)
        own_prev = tl.load(DSTATES + base + c_prev * step, mask=ok, other=0.0)
        state_prev = tl.load(STATES + base + c_prev * step, mask=ok, other=0.0)
        decay_prev = tl.exp(tl.load(da_last + c_prev * chunk_size))
        tl.store(DSTATES + base + c * step, dstate, mask=ok)
        tl.store(dda + c * tl.num_programs(1), decay * tl.sum(state * dstate, axis=0))
        dstate = decay * dstate + own
        own, state, decay = own_prev, state_prev, decay_prev
    tl.store(DINIT + pid.to(tl.int64) * dim + offs, dstate, mask=ok)


@triton.jit
def chunk_scan_bwd_source_kernel(
    X,
    B,
    C,
    CB,
    DT,
    DA_CS,
    DSTATES,
    D,
    DY,
    DX,
    DB,
    DDT_DIRECT,
    DDA_TO_END,
    DDA_INTRA,
    DD_PARTIAL,
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
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_dy_b,
    stride_dy_l,
    stride_dy_h,
    stride_dy_p,
    stride_dx_b,
    stride_dx_l,
    stride_dx_h,
    stride_db_b,
    stride_db_l,
    stride_db_g,
    HAS_D: tl.constexpr,
    D_PER_CHANNEL: tl.constexpr,
    CP: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (batch*chunk*group, source tile s), looping over the group's heads and, per head,
    over the target tiles l >= s from the last one down. Per head:

        dxdt_s  = exp(a_last - a_s) dT B_s + sum_{l >= s} CB[l, s] decay[l, s] dy_l
        dx_s    = dt_s dxdt_s + D dy_s                    -> DX
        ddt_s   = x_s . dxdt_s  (dt_s as a factor)        -> DDT_DIRECT
        V_s     = dt_s x_s . (exp(a_last - a_s) dT B_s)   -> DDA_TO_END  (d/d(a_last - a_s))
        W[l, s] = CB[l, s] decay[l, s] dt_s G[l, s]       -> DDA_INTRA[k] = sum_{l >= k, s < k} W
                  (this tile's columns s; suffix sums over l carried down the target tiles)
        dD      = sum_s dy_s x_s                          -> DD_PARTIAL
    and summed over the group's heads:
        dB_s    = sum_h [exp(a_last - a_s) dt_s x_s dT + sum_{l >= s} decay dt_s G[l, s] C_l]
    """
    pid = tl.program_id(0)
    g = pid % ngroups
    c = (pid // ngroups) % nchunks
    b = (pid // (ngroups * nchunks)).to(tl.int64)
    st = tl.program_id(1)
    NT: tl.constexpr = CP // BT
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    p_ok = p < headdim
    n_ok = n < dstate
    i_s, t_s, in_s, valid_s = chunk_positions(c, st * BT, chunk_size, seqlen, BT)
    t_s64 = t_s.to(tl.int64)
    mask_sp = valid_s[:, None] & p_ok[None, :]
    b_s = tl.load(
        B + b * stride_b_b + t_s64[:, None] * stride_b_l + g * stride_b_g + n[None, :] * stride_b_n,
        mask=valid_s[:, None] & n_ok[None, :],
        other=0.0,
    )
    cb_cols = CB + ((b * nchunks + c) * ngroups + g) * CP * CP + i_s[None, :]
    db = tl.zeros((BT, BN), dtype=tl.float32)
    for hh in range(0, heads_per_group):
        h = g * heads_per_group + hh
        row = (b * nheads + h) * padded_len + c * chunk_size
        da_s = tl.load(DA_CS + row + i_s, mask=in_s, other=0.0)
        dt_s = tl.load(DT + row + i_s, mask=in_s, other=0.0)
        to_end = tl.where(valid_s, tl.exp(tl.load(DA_CS + row + chunk_size - 1) - da_s), 0.0)
        x_s = tl.load(
            X
            + b * stride_x_b
            + t_s64[:, None] * stride_x_l
            + h * stride_x_h
            + p[None, :] * stride_x_p,
            mask=mask_sp,
            other=0.0,
        )
        dy_s = tl.load(
            DY
            + b * stride_dy_b
            + t_s64[:, None] * stride_dy_l
            + h * stride_dy_h
            + p[None, :] * stride_dy_p,
            mask=mask_sp,
            other=0.0,
        )
        d_state = tl.load(
            DSTATES
            + (((b * nchunks + c) * nheads + h) * headdim + p[:, None]) * dstate
            + n[None, :],
            mask=p_ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # dT (BP, BN)
        x_s32 = x_s.to(tl.float32)
        dxdt = mm(b_s, tl.trans(d_state), DOT_DTYPE, INTERPRET) * to_end[:, None]
        tl.store(DDA_TO_END + row + i_s, dt_s * tl.sum(x_s32 * dxdt, axis=1), mask=in_s)
        db += mm(x_s, d_state, DOT_DTYPE, INTERPRET) * (to_end * dt_s)[:, None]

        col_carry = tl.zeros((BT,), dtype=tl.float32)
        dda_intra = DDA_INTRA + (((b * nheads + h) * nchunks + c) * NT + st) * CP
        for j in range(0, NT - st):
            lt = NT - 1 - j
            i_l, t_l, in_l, valid_l = chunk_positions(c, lt * BT, chunk_size, seqlen, BT)
            t_l64 = t_l.to(tl.int64)
            da_l = tl.load(DA_CS + row + i_l, mask=in_l, other=0.0)
            dy_l = tl.load(
                DY
                + b * stride_dy_b
                + t_l64[:, None] * stride_dy_l
                + h * stride_dy_h
                + p[None, :] * stride_dy_p,
                mask=valid_l[:, None] & p_ok[None, :],
                other=0.0,
            )
            c_l = tl.load(
                C
                + b * stride_c_b
                + t_l64[:, None] * stride_c_l
                + g * stride_c_g
                + n[None, :] * stride_c_n,
                mask=valid_l[:, None] & n_ok[None, :],
                other=0.0,
            )
            causal = (i_l[:, None] >= i_s[None, :]) & valid_l[:, None] & valid_s[None, :]
            decay = causal_decay(da_l, da_s, causal)
            cb = tl.where(causal, tl.load(cb_cols + i_l[:, None] * CP), 0.0)
            dxdt += mm(tl.trans(cb * decay), dy_l, DOT_DTYPE, INTERPRET)
            wd = mm(dy_l, tl.trans(x_s), DOT_DTYPE, INTERPRET) * decay * dt_s[None, :]
            db += mm(tl.trans(wd), c_l, DOT_DTYPE, INTERPRET)
            w = wd * cb
            suffix = col_carry[None, :] + tl.cumsum(w, axis=0, reverse=True)
            rect = tl.sum(tl.where(i_l[:, None] > i_s[None, :], suffix, 0.0), axis=1)
            tl.store(dda_intra + i_l, rect, mask=in_l)
            col_carry += tl.sum(w, axis=0)

        dy_s32 = dy_s.to(tl.float32)
        dx = dt_s[:, None] * dxdt
        if HAS_D:
            if D_PER_CHANNEL:
                d = tl.load(D + h * headdim + p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
            else:
                d = tl.load(D + h).to(tl.float32)
            dx += d * dy_s32
            dd = DD_PARTIAL + (((b * nchunks + c) * NT + st) * nheads + h) * headdim + p
            tl.store(dd, tl.sum(dy_s32 * x_s32, axis=0), mask=p_ok)
        tl.store(
            DX + b * stride_dx_b + t_s64[:, None] * stride_dx_l + h * stride_dx_h + p[None, :],
            dx.to(DX.dtype.element_ty),
            mask=mask_sp,
        )
        tl.store(DDT_DIRECT + row + i_s, tl.sum(dxdt * x_s32, axis=1), mask=in_s)
    tl.store(
        DB + b * stride_db_b + t_s64[:, None] * stride_db_l + g * stride_db_g + n[None, :],
        db.to(DB.dtype.element_ty),
        mask=valid_s[:, None] & n_ok[None, :],
    )


@triton.jit
def chunk_scan_bwd_target_kernel(
    X,
    B,
    C,
    STATES,
    DT,
    DA_CS,
    DY,
    DC,
    DDA_READOUT,
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
    stride_b_b,
    stride_b_l,
    stride_b_g,
    stride_b_n,
    stride_c_b,
    stride_c_l,
    stride_c_g,
    stride_c_n,
    stride_dy_b,
    stride_dy_l,
    stride_dy_h,
    stride_dy_p,
    stride_dc_b,
    stride_dc_l,
    stride_dc_g,
    CP: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (batch*chunk*group, target tile l):

        dC_l = sum_h [exp(a_l) dy_l S + sum_{s <= l} decay[l, s] dt_s G[l, s] B_s]   -> DC
        R_l  = C_l . exp(a_l) dy_l S  per head (d/d a_l of the state readout)     -> DDA_READOUT
    The second sum runs over source tiles, adding the group's heads before the matmul with B_s.
    """
    pid = tl.program_id(0)
    g = pid % ngroups
    c = (pid // ngroups) % nchunks
    b = (pid // (ngroups * nchunks)).to(tl.int64)
    lt = tl.program_id(1)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    p_ok = p < headdim
    n_ok = n < dstate
    i_l, t_l, in_l, valid_l = chunk_positions(c, lt * BT, chunk_size, seqlen, BT)
    t_l64 = t_l.to(tl.int64)
    mask_lp = valid_l[:, None] & p_ok[None, :]
    mask_ln = valid_l[:, None] & n_ok[None, :]
    c_l = tl.load(
        C + b * stride_c_b + t_l64[:, None] * stride_c_l + g * stride_c_g + n[None, :] * stride_c_n,
        mask=mask_ln,
        other=0.0,
    ).to(tl.float32)
    dc = tl.zeros((BT, BN), dtype=tl.float32)
    for hh in range(0, heads_per_group):
        h = g * heads_per_group + hh
        row = (b * nheads + h) * padded_len + c * chunk_size
        da_l = tl.load(DA_CS + row + i_l, mask=in_l, other=0.0)
        dy_l = tl.load(
            DY
            + b * stride_dy_b
            + t_l64[:, None] * stride_dy_l
            + h * stride_dy_h
            + p[None, :] * stride_dy_p,
            mask=mask_lp,
            other=0.0,
        )
        state = tl.load(
            STATES
            + (((b * nchunks + c) * nheads + h) * headdim + p[:, None]) * dstate
            + n[None, :],
            mask=p_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        dc_h = mm(dy_l, state, DOT_DTYPE, INTERPRET) * tl.exp(da_l)[:, None]
        tl.store(DDA_READOUT + row + i_l, tl.sum(c_l * dc_h, axis=1), mask=in_l)
        dc += dc_h
    for st in range(0, lt + 1):
        i_s, t_s, in_s, valid_s = chunk_positions(c, st * BT, chunk_size, seqlen, BT)
        t_s64 = t_s.to(tl.int64)
        causal = (i_l[:, None] >= i_s[None, :]) & valid_l[:, None] & valid_s[None, :]
        dcb = tl.zeros((BT, BT), dtype=tl.float32)
        for hh in range(0, heads_per_group):
            h = g * heads_per_group + hh
            row = (b * nheads + h) * padded_len + c * chunk_size
            da_l = tl.load(DA_CS + row + i_l, mask=in_l, other=0.0)
            da_s = tl.load(DA_CS + row + i_s, mask=in_s, other=0.0)
            dt_s = tl.load(DT + row + i_s, mask=in_s, other=0.0)
            dy_l = tl.load(
                DY
                + b * stride_dy_b
                + t_l64[:, None] * stride_dy_l
                + h * stride_dy_h
                + p[None, :] * stride_dy_p,
                mask=mask_lp,
                other=0.0,
            )
            x_s = tl.load(
                X
                + b * stride_x_b
                + t_s64[:, None] * stride_x_l
                + h * stride_x_h
                + p[None, :] * stride_x_p,
                mask=valid_s[:, None] & p_ok[None, :],
                other=0.0,
            )
            decay = causal_decay(da_l, da_s, causal)
            dcb += mm(dy_l, tl.trans(x_s), DOT_DTYPE, INTERPRET) * decay * dt_s[None, :]
        b_s = tl.load(
            B
            + b * stride_b_b
            + t_s64[:, None] * stride_b_l
            + g * stride_b_g
            + n[None, :] * stride_b_n,
            mask=valid_s[:, None] & n_ok[None, :],
            other=0.0,
        )
        dc += mm(dcb, b_s, DOT_DTYPE, INTERPRET)
    tl.store(
        DC + b * stride_dc_b + t_l64[:, None] * stride_dc_l + g * stride_dc_g + n[None, :],
        dc.to(DC.dtype.element_ty),
        mask=mask_ln,
    )


@triton.jit
def chunk_cumsum_bwd_kernel(
    DT,
    A,
    DT_BIAS,
    DT_OUT,
    DDT_DIRECT,
    DDA_TO_END,
    DDA_INTRA,
    DDA_READOUT,
    DDA_LAST,
    DDT,
    DA_PARTIAL,
    DBIAS_PARTIAL,
    seqlen,
    nheads,
    chunk_size,
    nchunks,
    padded_len,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    stride_ddt_b,
    stride_ddt_l,
    dt_min,
    dt_max,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    CP: tl.constexpr,
    NT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (batch, chunk, head block): the gradient of dt * A at step k,

        d(dtA)_k = DDA_INTRA_k + sum_{l >= k} R_l + sum_{s < k} V_s + DDA_LAST[c]

    (each piece a sum of terms, never a difference of cumsums), then
    ddt = DDT_DIRECT + A d(dtA) through clamp, softplus and dt_bias to the raw dt -> DDT, and
    this chunk's parts of dA = sum dt d(dtA) and d dt_bias = sum ddt."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < nheads
    i, t, in_chunk, valid = chunk_positions(c, 0, chunk_size, seqlen, CP)
    mask = valid[:, None] & h_ok[None, :]
    in_mask = in_chunk[:, None] & h_ok[None, :]
    rows = (b * nheads + h[None, :]) * padded_len + c * chunk_size
    intra_rows = ((b * nheads + h[None, :]) * nchunks + c) * NT * CP + i[:, None]
    dda = tl.zeros((CP, BLOCK_H), dtype=tl.float32)
    for st in range(0, NT):
        dda += tl.load(DDA_INTRA + intra_rows + st * CP, mask=in_mask, other=0.0)
    readout = tl.load(DDA_READOUT + rows + i[:, None], mask=in_mask, other=0.0)
    dda += tl.cumsum(readout, axis=0, reverse=True)
    before = (i >= 1)[:, None] & in_mask
    dda += tl.cumsum(tl.load(DDA_TO_END + rows + i[:, None] - 1, mask=before, other=0.0), axis=0)
    dda += tl.load(DDA_LAST + (b * nheads + h) * nchunks + c, mask=h_ok, other=0.0)[None, :]
    dda = tl.where(mask, dda, 0.0)

    dt = tl.load(DT_OUT + rows + i[:, None], mask=mask, other=0.0)
    a = tl.load(A + h, mask=h_ok, other=0.0).to(tl.float32)
    ddt = tl.load(DDT_DIRECT + rows + i[:, None], mask=mask, other=0.0) + a[None, :] * dda
    tl.store(DA_PARTIAL + (b * nchunks + c) * nheads + h, tl.sum(dt * dda, axis=0), mask=h_ok)

    raw = tl.load(
        DT + b * stride_dt_b + t.to(tl.int64)[:, None] * stride_dt_l + h[None, :] * stride_dt_h,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(DT_BIAS + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LIMIT:
        if SOFTPLUS:
            unclamped = softplus(raw)
        else:
            unclamped = raw
        ddt = tl.where((unclamped >= dt_min) & (unclamped <= dt_max), ddt, 0.0)
    if SOFTPLUS:
        ddt = ddt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
    ddt = tl.where(mask, ddt, 0.0)
    tl.store(
        DDT + b * stride_ddt_b + t.to(tl.int64)[:, None] * stride_ddt_l + h[None, :],
        ddt.to(DDT.dtype.element_ty),
        mask=mask,
    )
    if HAS_BIAS:
        tl.store(DBIAS_PARTIAL + (b * nchunks + c) * nheads + h, tl.sum(ddt, axis=0), mask=h_ok)
