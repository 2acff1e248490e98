"""One step of Mamba2's selective state space recurrence in plain PyTorch: the eager reference of
the `ssd_step` op (kernels/ssd_step/triton.py is the GPU one).

Per batch b and head h (group g = h // (nheads // ngroups)), with dt processed as the chunked
scan processes it (kernels/ssd/eager.py::process_dt):

    state = exp(dt * A_h) * state + dt * outer(x, B_g)        (headdim x dstate)
    y     = state @ C_g + D_h * x

which is the scan's recurrence at one position, so a state prefilled by the chunked scan
(`return_final_states=True`) continues exactly where the scan stopped.
"""

from __future__ import annotations

import torch

from megatron_hybrid.kernels.ssd.eager import NO_DT_LIMIT, process_dt


def check_ssd_step_args(state, x, dt, A, B, C, D, dt_bias, dt_limit, name="ssd_step") -> None:
    """Raise ValueError naming the first argument whose shape or dtype does not fit."""

    def fail(arg: str, tensor: torch.Tensor, expected: str) -> None:
        raise ValueError(f"{name}: {arg} has shape {tuple(tensor.shape)}, expected {expected}")

    if x.dim() != 3:
        fail("x", x, "(batch, nheads, headdim)")
    batch, nheads, headdim = x.shape
    if state.dim() != 4 or state.shape[:3] != (batch, nheads, headdim):
        fail("state", state, f"(batch, nheads, headdim, dstate) with the first three {x.shape}")
    if not state.dtype.is_floating_point or state.dtype.itemsize < 4:
        raise ValueError(
            f"{name}: state is {state.dtype}; it accumulates over every token, so it must be "
            "float32 or float64 (the chunked scan returns its final states in float32)"
        )
    if dt.shape != (batch, nheads):
        fail("dt", dt, f"(batch, nheads) = {(batch, nheads)}")
    if A.shape != (nheads,):
        fail("A", A, f"(nheads,) = {(nheads,)}")
    dstate = state.shape[3]
    if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != dstate:
        fail("B", B, f"(batch, ngroups, dstate) with batch = {batch}, dstate = {dstate}")
    if C.shape != B.shape:
        fail("C", C, f"B's shape {tuple(B.shape)}")
    ngroups = B.shape[1]
    if ngroups == 0 or nheads % ngroups:
        raise ValueError(
            f"{name}: nheads ({nheads}, from x) must be a multiple of ngroups ({ngroups}, from B)"
        )
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        fail("D", D, f"(nheads,) = {(nheads,)} or (nheads, headdim) = {(nheads, headdim)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        fail("dt_bias", dt_bias, f"(nheads,) = {(nheads,)}")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"{name}: dt_limit must be (low, high) with low <= high, got {dt_limit!r}")


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
) -> torch.Tensor:
    """Advance `state` by one token in place and return that token's output.

    Args:
        state: (batch, nheads, headdim, dstate), float32 or float64; updated in place. Its dtype
            is the compute dtype.
        x: (batch, nheads, headdim).
        dt: (batch, nheads), processed like the chunked scan's (dt_bias, softplus, dt_limit).
        A: (nheads,); B, C: (batch, ngroups, dstate); D: optional (nheads,) or (nheads, headdim);
        dt_bias: optional (nheads,).

    Returns:
        y (batch, nheads, headdim) in x's dtype. Not differentiable through the in-place state
        (decoding runs without gradients).

    Raises:
        ValueError: an argument of the wrong shape (named with its shape), or a half-precision
            state.
    """
    check_ssd_step_args(state, x, dt, A, B, C, D, dt_bias, dt_limit)
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    per_group = nheads // ngroups
    compute = state.dtype
    dt_bh = process_dt(dt, dt_bias, dt_softplus, dt_limit, compute)
    decay_bh = torch.exp(dt_bh * A.to(compute))
    # Heads grouped as (batch, group, head in group, ...): B and C broadcast over a group's heads.
    x_bgrp = x.to(compute).view(batch, ngroups, per_group, headdim)
    state_bgrpn = state.view(batch, ngroups, per_group, headdim, dstate)
    B_bg11n = B.to(compute).view(batch, ngroups, 1, 1, dstate)
    C_bg1n1 = C.to(compute).view(batch, ngroups, 1, dstate, 1)
    xdt_bgrp = dt_bh.view(batch, ngroups, per_group, 1) * x_bgrp
    state_bgrpn.mul_(decay_bh.view(batch, ngroups, per_group, 1, 1))
    state_bgrpn.add_(xdt_bgrp.unsqueeze(-1) * B_bg11n)
    y_bhp = (state_bgrpn @ C_bg1n1).view(batch, nheads, headdim)
    if D is not None:
        D_h = D.to(compute)
        y_bhp = y_bhp + x.to(compute) * (D_h if D_h.dim() == 2 else D_h.unsqueeze(-1))
    return y_bhp.to(x.dtype)
