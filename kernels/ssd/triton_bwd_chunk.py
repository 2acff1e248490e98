"""Triton kernels of the SSD chunked scan's backward, "chunk" variant: whole-chunk programs per
(batch, chunk, head) for dx, ddt and dD, and per (batch, chunk, group) source tile for dB, whose
CB part sums the group's heads on the small chunk-position tiles before its one matmul, and the
intra-chunk part of the gradient of a (from the same per-head tiles). kernels/ssd/triton.py
selects between this variant and the "split" one (kernels/ssd/triton_bwd.py) and has the
formulas; the notation is that of triton_bwd.py: a = DA_CS, dT the gradient of the chunk's own
end state, G[l, s] = dy_l . x_s, decay[l, s] = exp(a_l - a_s) for s <= l (else 0).

The other backward steps (chunk-state gradients, state passing, dC and the state readout's part
of the gradient of a, chunk cumsum) are the split variant's kernels, shared.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron_hybrid.kernels.ssd.triton_fwd import causal_decay, chunk_positions, mm


@triton.jit
def chunk_scan_bwd_dx_kernel(
    X,
    B,
    CB,
    DT,
    DA_CS,
    DSTATES,
    D,
    DY,
    DX,
    DDT_DIRECT,
    DDA_TO_END,
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
    stride_dy_b,
    stride_dy_l,
    stride_dy_h,
    stride_dy_p,
    stride_dx_b,
    stride_dx_l,
    stride_dx_h,
    HAS_D: tl.constexpr,
    D_PER_CHANNEL: tl.constexpr,
    CP: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    BNS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (batch*chunk*head), the whole chunk: source tiles s of BM positions in turn,
    and per source tile the target tiles l >= s of BK positions (tiles of their own, so the
    dots can be larger than the dB kernel's); the state term over slices of BNS of dstate.

        dxdt_s  = exp(a_last - a_s) dT B_s + sum_{l >= s} CB[l, s] decay[l, s] dy_l
        dx_s    = dt_s dxdt_s + D dy_s                    -> DX
        ddt_s   = x_s . dxdt_s  (dt_s as a factor)        -> DDT_DIRECT
        V_s     = dt_s x_s . (exp(a_last - a_s) dT B_s)   -> DDA_TO_END
        dD      = sum over the chunk of dy_s x_s          -> DD_PARTIAL[b, c, h]
    """
    pid = tl.program_id(0)
    h = pid % nheads  # heads of a group in neighbouring programs: their CB tiles stay in L2
    c = (pid // nheads) % nchunks
    b = (pid // (nheads * nchunks)).to(tl.int64)
    g = h // heads_per_group
    NM: tl.constexpr = CP // BM
    NK: tl.constexpr = CP // BK
    p = tl.arange(0, BP)
    p_ok = p < headdim
    row = (b * nheads + h) * padded_len + c * chunk_size
    a_last = tl.load(DA_CS + row + chunk_size - 1)
    cb_chunk = CB + ((b * nchunks + c) * ngroups + g) * CP * CP
    d_state_t_ptrs = DSTATES + (((b * nchunks + c) * nheads + h) * headdim + p[None, :]) * dstate
    if HAS_D:
        if D_PER_CHANNEL:
            d = tl.load(D + h * headdim + p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        else:
            d = tl.load(D + h).to(tl.float32)
    dd = tl.zeros((BP,), dtype=tl.float32)
    for st in range(0, NM):
        i_s, t_s, in_s, valid_s = chunk_positions(c, st * BM, chunk_size, seqlen, BM)
        t_s64 = t_s.to(tl.int64)
        mask_sp = valid_s[:, None] & p_ok[None, :]
        da_s = tl.load(DA_CS + row + i_s, mask=in_s, other=0.0)
        dt_s = tl.load(DT + row + i_s, mask=in_s, other=0.0)
        to_end = tl.where(valid_s, tl.exp(a_last - da_s), 0.0)
        x_s_ptrs = (
            X
            + b * stride_x_b
            + t_s64[:, None] * stride_x_l
            + h * stride_x_h
            + p[None, :] * stride_x_p
        )
        # The state term B_s dT^T over slices of dstate: a whole (headdim, dstate) float32 dT
        # beside the accumulator spills registers (kernels/ssd/triton.py, _CHUNK_DX_STATE_SLICE).
        dxdt = tl.zeros((BM, BP), dtype=tl.float32)
        for n0 in range(0, BN, BNS):
            ns = n0 + tl.arange(0, BNS)
            ns_ok = ns < dstate
            b_s = tl.load(
                B
                + b * stride_b_b
                + t_s64[:, None] * stride_b_l
                + g * stride_b_g
                + ns[None, :] * stride_b_n,
                mask=valid_s[:, None] & ns_ok[None, :],
                other=0.0,
            )
            d_state_t = tl.load(
                d_state_t_ptrs + ns[:, None], mask=ns_ok[:, None] & p_ok[None, :], other=0.0
            )
            dxdt += mm(b_s, d_state_t, DOT_DTYPE, INTERPRET)
        dxdt *= to_end[:, None]
        x_s32 = tl.load(x_s_ptrs, mask=mask_sp, other=0.0).to(tl.float32)
        tl.store(DDA_TO_END + row + i_s, dt_s * tl.sum(x_s32 * dxdt, axis=1), mask=in_s)

        for lt in range(st * BM // BK, NK):
            i_l, t_l, in_l, valid_l = chunk_positions(c, lt * BK, chunk_size, seqlen, BK)
            da_l = tl.load(DA_CS + row + i_l, mask=in_l, other=0.0)
            dy_l = tl.load(
                DY
                + b * stride_dy_b
                + t_l.to(tl.int64)[:, None] * stride_dy_l
                + h * stride_dy_h
                + p[None, :] * stride_dy_p,
                mask=valid_l[:, None] & p_ok[None, :],
                other=0.0,
            )
            causal = (i_l[:, None] >= i_s[None, :]) & valid_l[:, None] & valid_s[None, :]
            cb = tl.where(causal, tl.load(cb_chunk + i_l[:, None] * CP + i_s[None, :]), 0.0)
            dxdt += mm(tl.trans(cb * causal_decay(da_l, da_s, causal)), dy_l, DOT_DTYPE, INTERPRET)

        # x_s again (from L1) rather than live in registers across the target loop.
        x_s32 = tl.load(x_s_ptrs, mask=mask_sp, other=0.0).to(tl.float32)
        dx = dt_s[:, None] * dxdt
        if HAS_D:
            dy_s32 = tl.load(
                DY
                + b * stride_dy_b
                + t_s64[:, None] * stride_dy_l
                + h * stride_dy_h
                + p[None, :] * stride_dy_p,
                mask=mask_sp,
                other=0.0,
            ).to(tl.float32)
            dx += d * dy_s32
            dd += tl.sum(dy_s32 * x_s32, axis=0)
        tl.store(
            DX + b * stride_dx_b + t_s64[:, None] * stride_dx_l + h * stride_dx_h + p[None, :],
            dx.to(DX.dtype.element_ty),
            mask=mask_sp,
        )
        tl.store(DDT_DIRECT + row + i_s, tl.sum(dxdt * x_s32, axis=1), mask=in_s)
    if HAS_D:
        tl.store(DD_PARTIAL + ((b * nchunks + c) * nheads + h) * headdim + p, dd, mask=p_ok)


@triton.jit
def chunk_scan_bwd_db_kernel(
    X,
    C,
    CB,
    DT,
    DA_CS,
    DSTATES,
    DY,
    DB,
    DDA_INTRA,
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
    stride_dy_b,
    stride_dy_l,
    stride_dy_h,
    stride_dy_p,
    stride_db_b,
    stride_db_l,
    stride_db_g,
    CP: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    HPG: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (source tile s, batch*chunk*group), the target tiles l >= s from the last one
    down, the group's heads inside each:

        dB_s    = sum_h exp(a_last - a_s) dt_s x_s dT  +  sum_{l >= s} dCB[l, s] C_l,
        dCB     = sum_h decay[l, s] dt_s G[l, s]
        W[l, s] = CB[l, s] decay[l, s] dt_s G[l, s]   per head -> DDA_INTRA[s tile][k] =
                  sum_{l >= k, s < k} W over the tile's columns s (triton_bwd.py's layout)

    dCB is summed over the group's heads on each (l, s) tile first, then one matmul with C_l
    per tile (the split variant's source kernel multiplies each head's part by C_l). W reuses
    each head's G; the column sums of W over the target tiles already seen (the part of the
    rectangle sums from later tiles) are carried per head in a (HPG, BT) tile, HPG >= the
    group's heads. The source tiles of one group are neighbouring programs (their dT and x
    tiles are shared through L2)."""
    NT: tl.constexpr = CP // BT
    pid = tl.program_id(0)
    st = pid % NT
    g = (pid // NT) % ngroups
    c = (pid // (NT * ngroups)) % nchunks
    b = (pid // (NT * ngroups * nchunks)).to(tl.int64)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    p_ok = p < headdim
    n_ok = n < dstate
    i_s, t_s, in_s, valid_s = chunk_positions(c, st * BT, chunk_size, seqlen, BT)
    t_s64 = t_s.to(tl.int64)
    mask_sp = valid_s[:, None] & p_ok[None, :]
    x_s_ptrs = X + b * stride_x_b + t_s64[:, None] * stride_x_l + p[None, :] * stride_x_p
    db = tl.zeros((BT, BN), dtype=tl.float32)
    for hh in range(0, heads_per_group):
        h = g * heads_per_group + hh
        row = (b * nheads + h) * padded_len + c * chunk_size
        da_s = tl.load(DA_CS + row + i_s, mask=in_s, other=0.0)
        dt_s = tl.load(DT + row + i_s, mask=in_s, other=0.0)
        to_end = tl.where(valid_s, tl.exp(tl.load(DA_CS + row + chunk_size - 1) - da_s), 0.0)
        x_s = tl.load(x_s_ptrs + h * stride_x_h, mask=mask_sp, other=0.0)
        d_state = tl.load(
            DSTATES
            + (((b * nchunks + c) * nheads + h) * headdim + p[:, None]) * dstate
            + n[None, :],
            mask=p_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        db += mm(x_s, d_state, DOT_DTYPE, INTERPRET) * (to_end * dt_s)[:, None]

    cb_cols = CB + ((b * nchunks + c) * ngroups + g) * CP * CP + i_s[None, :]
    heads = tl.arange(0, HPG)
    carry = tl.zeros((HPG, BT), dtype=tl.float32)  # per head: sum of W over tiles seen
    for j in range(0, NT - st):
        lt = NT - 1 - j
        i_l, t_l, in_l, valid_l = chunk_positions(c, lt * BT, chunk_size, seqlen, BT)
        t_l64 = t_l.to(tl.int64)
        causal = (i_l[:, None] >= i_s[None, :]) & valid_l[:, None] & valid_s[None, :]
        cb = tl.where(causal, tl.load(cb_cols + i_l[:, None] * CP), 0.0)
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
                mask=valid_l[:, None] & p_ok[None, :],
                other=0.0,
            )
            x_s = tl.load(x_s_ptrs + h * stride_x_h, mask=mask_sp, other=0.0)
            decay = causal_decay(da_l, da_s, causal)
            wd = mm(dy_l, tl.trans(x_s), DOT_DTYPE, INTERPRET) * decay * dt_s[None, :]
            dcb += wd
            w = wd * cb
            this_head = (heads == hh)[:, None]
            col_carry = tl.sum(tl.where(this_head, carry, 0.0), axis=0)
            suffix = col_carry[None, :] + tl.cumsum(w, axis=0, reverse=True)
            rect = tl.sum(tl.where(i_l[:, None] > i_s[None, :], suffix, 0.0), axis=1)
            dda_intra = DDA_INTRA + (((b * nheads + h) * nchunks + c) * NT + st) * CP
            tl.store(dda_intra + i_l, rect, mask=in_l)
            carry = tl.where(this_head, carry + tl.sum(w, axis=0)[None, :], carry)
        c_l = tl.load(
            C
            + b * stride_c_b
            + t_l64[:, None] * stride_c_l
            + g * stride_c_g
            + n[None, :] * stride_c_n,
            mask=valid_l[:, None] & n_ok[None, :],
            other=0.0,
        )
        db += mm(tl.trans(dcb), c_l, DOT_DTYPE, INTERPRET)
    tl.store(
        DB + b * stride_db_b + t_s64[:, None] * stride_db_l + g * stride_db_g + n[None, :],
        db.to(DB.dtype.element_ty),
        mask=valid_s[:, None] & n_ok[None, :],
    )
