"""The decoding steps of Mamba2 (kernels/ssd_step/eager.py, kernels/conv1d_step/eager.py)
continue the whole-sequence kernels exactly: a state prefilled by the chunked scan (its final
state) and stepped one token at a time gives the scan's outputs and final state, and stepping the
conv's window gives the causal conv's outputs.

Float64 on random inputs: the step and the chunked scan evaluate the same recurrence in another
order (a product of per-step decays against exp of chunk sums), which in float64 agree to ~1e-15
relative per operation; over 23 steps 1e-10 leaves orders of magnitude of margin and still fails
on any wrong term (a missing decay, B and C of the wrong group, D skipped: errors of order 1).
"""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.kernels.conv1d.eager import causal_conv1d
from megatron_hybrid.kernels.conv1d_step.eager import causal_conv1d_step
from megatron_hybrid.kernels.ssd.eager import ssd_chunked_scan
from megatron_hybrid.kernels.ssd_step.eager import ssd_step

F64 = dict(rtol=1e-10, atol=1e-10)
BATCH, SEQ, HEADS, HEADDIM, GROUPS, DSTATE, CHUNK = 2, 23, 4, 3, 2, 5, 4


def ssd_inputs(dtype=torch.float64, d_per_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=randn(BATCH, SEQ, HEADS, HEADDIM),
        dt=randn(BATCH, SEQ, HEADS),
        A=-torch.rand(HEADS, generator=g, dtype=dtype) * 3 - 0.5,
        B=randn(BATCH, SEQ, GROUPS, DSTATE),
        C=randn(BATCH, SEQ, GROUPS, DSTATE),
        D=randn(HEADS, HEADDIM) if d_per_row else randn(HEADS),
        dt_bias=randn(HEADS) * 0.5,
    )


def step_through(state, inputs, start, stop, **dt_options):
    """Outputs of positions start..stop-1 stepped one at a time from `state` (updated)."""
    ys = []
    for t in range(start, stop):
        ys.append(
            ssd_step(
                state,
                inputs["x"][:, t],
                inputs["dt"][:, t],
                inputs["A"],
                inputs["B"][:, t],
                inputs["C"][:, t],
                D=inputs["D"],
                dt_bias=inputs["dt_bias"],
                **dt_options,
            )
        )
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("prefill", [0, 1, 8, 13], ids=lambda n: f"prefill{n}")
@pytest.mark.parametrize(
    "dt_options",
    [dict(dt_softplus=True), dict(dt_softplus=True, dt_limit=(0.05, 0.8)), dict()],
    ids=["softplus", "softplus-clamped", "raw-dt"],
)
def test_ssd_step_continues_the_chunked_scan(prefill, dt_options):
    inputs = ssd_inputs(d_per_row=prefill == 13)
    if not dt_options:  # raw dt is used as is: keep it positive
        inputs["dt"] = inputs["dt"].abs() * 0.3
    y_full, final = ssd_chunked_scan(
        **inputs, chunk_size=CHUNK, return_final_states=True, **dt_options
    )
    if prefill:
        prefix = {k: v[:, :prefill] if v.dim() > 2 else v for k, v in inputs.items()}
        _, state = ssd_chunked_scan(
            **prefix, chunk_size=CHUNK, return_final_states=True, **dt_options
        )
    else:
        state = torch.zeros(BATCH, HEADS, HEADDIM, DSTATE, dtype=torch.float64)
    y_steps = step_through(state, inputs, prefill, SEQ, **dt_options)
    assert y_full.abs().max() > 0.1  # outputs worth comparing
    torch.testing.assert_close(y_steps, y_full[:, prefill:], **F64)
    torch.testing.assert_close(state, final, **F64)


def test_ssd_step_in_float32_keeps_a_float32_state():
    # float32 inputs, float32 state (what the chunked scan returns): the same recurrence rounded
    # at ~6e-8 per operation; 23 steps stay well inside 1e-5.
    inputs = ssd_inputs(dtype=torch.float32)
    y_full, final = ssd_chunked_scan(
        **inputs, chunk_size=CHUNK, return_final_states=True, dt_softplus=True
    )
    state = torch.zeros(BATCH, HEADS, HEADDIM, DSTATE)
    y_steps = step_through(state, inputs, 0, SEQ, dt_softplus=True)
    assert y_steps.dtype == torch.float32 and state.dtype == torch.float32
    torch.testing.assert_close(y_steps, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)


def test_ssd_step_refuses_a_half_precision_state_and_names_bad_shapes():
    inputs = ssd_inputs(dtype=torch.float32)
    args = (inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0])
    with pytest.raises(ValueError, match="state is torch.bfloat16.*float32 or float64"):
        ssd_step(
            torch.zeros(BATCH, HEADS, HEADDIM, DSTATE, dtype=torch.bfloat16),
            *args,
            inputs["C"][:, 0],
        )
    with pytest.raises(ValueError, match=r"ssd_step: state has shape \(2, 4, 3, 5, 1\)"):
        ssd_step(torch.zeros(BATCH, HEADS, HEADDIM, DSTATE, 1), *args, inputs["C"][:, 0])
    with pytest.raises(ValueError, match=r"ssd_step: C has shape \(2, 2, 4\)"):
        ssd_step(torch.zeros(BATCH, HEADS, HEADDIM, DSTATE), *args, inputs["C"][:, 0, :, :4])


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv1d_step_continues_the_causal_conv(width, activation):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 1, width, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    expected = causal_conv1d(x, weight, bias, activation)
    # The state a prompt of 5 leaves: its last width-1 inputs (a sequence shorter than the
    # window is covered by the zeros the state starts from).
    prefill = 5
    state = torch.zeros(BATCH, 6, width - 1, dtype=torch.float64)
    if width > 1:
        state[...] = x[:, prefill - (width - 1) : prefill].transpose(1, 2)
    steps = [
        causal_conv1d_step(x[:, t], state, weight, bias, activation) for t in range(prefill, SEQ)
    ]
    torch.testing.assert_close(torch.stack(steps, dim=1), expected[:, prefill:], **F64)
    if width > 1:
        torch.testing.assert_close(state, x[:, SEQ - (width - 1) :].transpose(1, 2), **F64)


def test_conv1d_step_names_a_state_of_the_wrong_shape():
    x, weight = torch.randn(2, 6), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"state has shape \(2, 6, 4\), expected .* \(2, 6, 3\)"):
        causal_conv1d_step(x, torch.zeros(2, 6, 4), weight)
