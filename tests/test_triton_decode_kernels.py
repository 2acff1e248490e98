"""Triton decoding steps (kernels/ssd_step/triton.py, kernels/conv1d_step/triton.py) against their
eager references: outputs and the in-place state updates, float32 and bfloat16 inputs (the SSM
state stays float32), D per head and per row, a dt clamp, torch.library.opcheck.

On CPU the kernels run under Triton's interpreter at tiny shapes: headdim 12 and dstate 10 (masked
blocks of 16), and for the SSM step a tile small enough that headdim spans three programs.

Tolerances: tests/kernel_checks.py. Each state entry is one decay product plus one input term;
y sums dstate = 10 products: float32 agrees within a few ulp (1e-5). bfloat16 inputs are upcast
exactly; only y is rounded once to bfloat16 (the 2-ulp rtol 1.6e-2); the float32 state keeps 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import TOLERANCE, randn, require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.conv1d_step import eager as eager_conv  # noqa: E402
from megatron_hybrid.kernels.conv1d_step import triton as triton_conv  # noqa: E402
from megatron_hybrid.kernels.ssd_step import eager as eager_ssd  # noqa: E402
from megatron_hybrid.kernels.ssd_step import triton as triton_ssd  # noqa: E402

BATCH, HEADS, GROUPS, HEADDIM, DSTATE = 2, 4, 2, 12, 10
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
STATE_TOLERANCE = TOLERANCE[torch.float32]


def ssd_step_args(dtype, d_per_row=False):
    return dict(
        x=randn(BATCH, HEADS, HEADDIM, dtype=dtype, seed=1),
        dt=randn(BATCH, HEADS, dtype=dtype, seed=2),
        A=-(randn(HEADS, seed=3).abs() + 0.5),
        B=randn(BATCH, GROUPS, DSTATE, dtype=dtype, seed=4),
        C=randn(BATCH, GROUPS, DSTATE, dtype=dtype, seed=5),
        D=randn(HEADS, HEADDIM, seed=6) if d_per_row else randn(HEADS, seed=6),
        dt_bias=randn(HEADS, seed=7),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "options",
    [dict(dt_softplus=True), dict(dt_softplus=True, dt_limit=(0.1, 0.9), d_per_row=True)],
    ids=["softplus", "clamped-Drows"],
)
def test_ssd_step_matches_eager(dtype, options, monkeypatch):
    # 64 state elements per program: blocks of 4 headdim rows over dstate's 16, so the 12 rows
    # of a head span three programs.
    monkeypatch.setattr(triton_ssd, "_TILE_ELEMENTS", 64)
    options = dict(options)
    args = ssd_step_args(dtype, d_per_row=options.pop("d_per_row", False))
    state = randn(BATCH, HEADS, HEADDIM, DSTATE, seed=8)
    state_eager = state.clone()
    # Two steps in a row: the second reads the state the first wrote.
    for _ in range(2):
        y = triton_ssd.ssd_step(state, **args, **options)
        y_ref = eager_ssd.ssd_step(
            state_eager, **{k: v.float() for k, v in args.items()}, **options
        )
        assert y.dtype == dtype and y.shape == args["x"].shape
        torch.testing.assert_close(y, y_ref.to(dtype), **TOLERANCE[dtype])
        torch.testing.assert_close(state, state_eager, **STATE_TOLERANCE)
    assert y_ref.abs().max() > 0.1


def test_ssd_step_opcheck():
    args = ssd_step_args(torch.float32)
    state = randn(BATCH, HEADS, HEADDIM, DSTATE, seed=8)
    torch.library.opcheck(
        triton_ssd._ssd_step_op,
        (state, *args.values(), True, 0.0, float("inf")),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv1d_step_matches_eager(dtype, width, activation, monkeypatch):
    monkeypatch.setattr(triton_conv, "_BLOCK_C", 16)  # 40 channels: three programs
    channels = 40
    x = randn(BATCH, channels, dtype=dtype, seed=1)
    weight = randn(channels, 1, width, dtype=dtype, seed=2)
    bias = randn(channels, dtype=dtype, seed=3)
    state = randn(BATCH, channels, width - 1, dtype=dtype, seed=4)
    state_eager = state.float().clone()  # never the same tensor, even in float32
    for _ in range(2):
        y = triton_conv.causal_conv1d_step(x, state, weight, bias, activation)
        y_ref = eager_conv.causal_conv1d_step(
            x.float(), state_eager, weight.float(), bias.float(), activation
        )
        assert y.dtype == dtype
        torch.testing.assert_close(y, y_ref.to(dtype), **TOLERANCE[dtype])
        # The state holds inputs, moved, never rounded: equal exactly.
        torch.testing.assert_close(state.float(), state_eager, rtol=0, atol=0)
        x = randn(BATCH, channels, dtype=dtype, seed=5)
    assert y_ref.abs().max() > 0.1


def test_conv1d_step_opcheck():
    x, weight, bias = randn(2, 8, seed=1), randn(8, 4, seed=2), randn(8, seed=3)
    state = randn(2, 8, 3, seed=4)
    torch.library.opcheck(
        triton_conv._conv1d_step_op,
        (x, state, weight, bias, True),
        test_utils=("test_schema", "test_faketensor"),
    )
