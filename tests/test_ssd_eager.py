"""ssd_chunked_scan against the SSD recurrence, written out step by step in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_hybrid.kernels.ssd.eager import ssd_chunked_scan

# Chunked and sequential evaluation are the same sums of the same float64 products, only
# associated differently, so they agree to a few ulps of the largest intermediate.
TIGHT = dict(atol=1e-10, rtol=1e-10)


def loop_reference(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, math.inf),
    initial_states=None,
):
    """The recurrence one time step at a time in float64; returns (y, final_states)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, seqlen, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    B_BLHN = B.repeat_interleave(heads_per_group, dim=2)
    C_BLHN = C.repeat_interleave(heads_per_group, dim=2)
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    if initial_states is None:
        state = x.new_zeros(batch, nheads, headdim, B.shape[3])
    else:
        state = initial_states.double()
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        update = dt[:, t, :, None, None] * x[:, t, :, :, None] * B_BLHN[:, t, :, None, :]
        state = decay * state + update
        y = torch.einsum("bhpn,bhn->bhp", state, C_BLHN[:, t])
        if D is not None:
            D_HP = D.double() if D.dim() == 2 else D.double()[:, None]
            y = y + D_HP * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def make_inputs(
    batch=2,
    seqlen=16,
    nheads=4,
    headdim=3,
    ngroups=2,
    dstate=5,
    *,
    seed=0,
    dtype=torch.float64,
    with_D=None,
    with_dt_bias=False,
    with_initial=False,
):
    """Random, never-zero inputs; A < 0 and dt > 0 as in a trained Mamba2 layer."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    args = dict(
        x=randn(batch, seqlen, nheads, headdim),
        dt=F.softplus(randn(batch, seqlen, nheads)),
        A=-torch.exp(randn(nheads)),
        B=randn(batch, seqlen, ngroups, dstate),
        C=randn(batch, seqlen, ngroups, dstate),
    )
    if with_D == "per_head":
        args["D"] = randn(nheads)
    elif with_D == "per_channel":
        args["D"] = randn(nheads, headdim)
    if with_dt_bias:
        args["dt_bias"] = randn(nheads)
        args["dt"] = randn(batch, seqlen, nheads)  # raw, softplus makes it positive
    if with_initial:
        args["initial_states"] = randn(batch, nheads, headdim, dstate)
    return {k: v.to(dtype) for k, v in args.items()}


def assert_matches_reference(chunk_size, inputs, **options):
    y, final = ssd_chunked_scan(
        **inputs, chunk_size=chunk_size, return_final_states=True, **options
    )
    y_ref, final_ref = loop_reference(**inputs, **options)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(final, final_ref, **TIGHT)


def test_matches_recurrence_when_seqlen_is_a_multiple_of_chunk_size():
    assert_matches_reference(4, make_inputs(seqlen=16))


@pytest.mark.parametrize("seqlen", [1, 7, 13])
def test_matches_recurrence_when_seqlen_is_not_a_multiple_of_chunk_size(seqlen):
    assert_matches_reference(4, make_inputs(seqlen=seqlen))


def test_matches_recurrence_with_chunk_size_one():
    assert_matches_reference(1, make_inputs(seqlen=9))


def test_matches_recurrence_with_one_chunk_longer_than_seqlen():
    assert_matches_reference(64, make_inputs(seqlen=11))


@pytest.mark.parametrize("ngroups", [1, 2, 6], ids=["one_group", "in_between", "group_per_head"])
def test_matches_recurrence_for_any_grouping_of_heads(ngroups):
    assert_matches_reference(4, make_inputs(nheads=6, ngroups=ngroups, seqlen=10))


@pytest.mark.parametrize("with_D", ["per_head", "per_channel"])
def test_D_adds_a_skip_connection(with_D):
    assert_matches_reference(4, make_inputs(with_D=with_D, seqlen=10))


def test_dt_bias_is_added_before_softplus():
    assert_matches_reference(4, make_inputs(with_dt_bias=True, seqlen=10), dt_softplus=True)


def test_dt_limit_clamps_processed_dt():
    inputs = make_inputs(with_dt_bias=True, seqlen=10)
    assert_matches_reference(4, inputs, dt_softplus=True, dt_limit=(0.3, 1.2))


def test_initial_states_start_the_recurrence():
    assert_matches_reference(4, make_inputs(with_initial=True, seqlen=10))


def test_without_final_states_returns_only_y():
    inputs = make_inputs()
    y = ssd_chunked_scan(**inputs, chunk_size=4)
    torch.testing.assert_close(y, loop_reference(**inputs)[0], **TIGHT)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 12),
    ngroups=st.integers(1, 2),
    heads_per_group=st.integers(1, 2),
    headdim=st.integers(1, 3),
    dstate=st.integers(1, 3),
    chunk_size=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_matches_recurrence_for_arbitrary_small_shapes(
    batch, seqlen, ngroups, heads_per_group, headdim, dstate, chunk_size, seed
):
    inputs = make_inputs(
        batch,
        seqlen,
        ngroups * heads_per_group,
        headdim,
        ngroups,
        dstate,
        seed=seed,
        with_D="per_head",
        with_initial=True,
    )
    assert_matches_reference(chunk_size, inputs)


def test_splitting_the_sequence_and_passing_final_states_on_changes_nothing():
    inputs = make_inputs(seqlen=20, with_D="per_head")
    y, final = ssd_chunked_scan(**inputs, chunk_size=4, return_final_states=True)
    split = 7  # not on a chunk boundary

    def part(t, s):
        return t if t.dim() < 3 else t[:, s]

    first = {k: part(v, slice(None, split)) for k, v in inputs.items()}
    second = {k: part(v, slice(split, None)) for k, v in inputs.items()}
    y1, mid = ssd_chunked_scan(**first, chunk_size=4, return_final_states=True)
    y2, final2 = ssd_chunked_scan(
        **second, chunk_size=4, initial_states=mid, return_final_states=True
    )
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, **TIGHT)
    torch.testing.assert_close(final2, final, **TIGHT)


DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def test_gradients_pass_gradcheck():
    inputs = make_inputs(
        batch=1,
        seqlen=5,
        nheads=2,
        headdim=2,
        ngroups=1,
        dstate=2,
        with_D="per_channel",
        with_dt_bias=True,
        with_initial=True,
    )
    names = list(inputs)
    assert sorted(names) == sorted(DIFFERENTIABLE)

    def f(*tensors):
        return ssd_chunked_scan(
            **dict(zip(names, tensors, strict=True)),
            chunk_size=2,
            dt_softplus=True,
            return_final_states=True,
        )

    tensors = [t.requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(f, tensors)


def test_gradients_match_autograd_through_the_recurrence():
    inputs = make_inputs(
        batch=2,
        seqlen=13,
        nheads=4,
        headdim=3,
        ngroups=2,
        dstate=4,
        with_D="per_head",
        with_dt_bias=True,
        with_initial=True,
    )
    for t in inputs.values():
        t.requires_grad_()
    y, final = ssd_chunked_scan(**inputs, chunk_size=4, dt_softplus=True, return_final_states=True)
    y_ref, final_ref = loop_reference(**inputs, dt_softplus=True)
    # Random cotangents, so no gradient is a plain sum that could hide a wrong sign or index.
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=g, dtype=y.dtype)
    w_final = torch.randn(final.shape, generator=g, dtype=final.dtype)
    grads = torch.autograd.grad((y * w_y).sum() + (final * w_final).sum(), list(inputs.values()))
    grads_ref = torch.autograd.grad(
        (y_ref * w_y).sum() + (final_ref * w_final).sum(), list(inputs.values())
    )
    for name, grad, grad_ref in zip(inputs, grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, **TIGHT, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32_and_return_y_in_their_dtype(dtype):
    inputs = make_inputs(seqlen=24, with_D="per_head", with_initial=True, dtype=dtype)
    y, final = ssd_chunked_scan(**inputs, chunk_size=8, return_final_states=True)
    assert y.dtype == dtype
    assert final.dtype == torch.float32
    # The reference sees exactly the rounded half inputs, so what remains is float32 rounding
    # inside (~1e-6 relative) plus one rounding of y to the output dtype, at most half an ulp:
    # 2**-8 relative for bfloat16's 8-bit significand, 2**-11 for float16's 11 bits. Allow a
    # whole ulp so the float32 error on top cannot tip a value that rounds at the limit.
    y_ref, final_ref = loop_reference(**inputs)
    output_ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(y.double(), y_ref, rtol=output_ulp, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


def test_float32_A_and_D_do_not_promote_half_outputs():
    inputs = make_inputs(with_D="per_head", dtype=torch.bfloat16)
    inputs["A"], inputs["D"] = inputs["A"].float(), inputs["D"].float()
    assert ssd_chunked_scan(**inputs, chunk_size=4).dtype == torch.bfloat16


def _replace(**changes):
    inputs = make_inputs(with_D="per_head", with_dt_bias=True, with_initial=True)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    "inputs, match",
    [
        (_replace(x=torch.ones(2, 16, 4)), r"x has shape \(2, 16, 4\)"),
        (_replace(dt=torch.ones(2, 15, 4)), r"dt has shape \(2, 15, 4\)"),
        (_replace(A=torch.ones(3)), r"A has shape \(3,\)"),
        (_replace(B=torch.ones(2, 16, 5)), r"B has shape \(2, 16, 5\)"),
        (_replace(B=torch.ones(1, 16, 2, 5)), r"B has shape \(1, 16, 2, 5\)"),
        (_replace(C=torch.ones(2, 16, 2, 4)), r"C has shape \(2, 16, 2, 4\)"),
        (_replace(B=torch.ones(2, 16, 3, 5), C=torch.ones(2, 16, 3, 5)), r"multiple of ngroups"),
        (_replace(D=torch.ones(4, 2)), r"D has shape \(4, 2\)"),
        (_replace(dt_bias=torch.ones(2)), r"dt_bias has shape \(2,\)"),
        (_replace(initial_states=torch.ones(2, 4, 3, 4)), r"initial_states has shape"),
    ],
    ids=["x_rank", "dt", "A", "B_rank", "B_batch", "C", "ngroups", "D", "dt_bias", "initial"],
)
def test_shape_mismatches_raise_value_error_naming_the_tensor(inputs, match):
    with pytest.raises(ValueError, match=match):
        ssd_chunked_scan(**inputs, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.0])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked_scan(**make_inputs(), chunk_size=chunk_size)


def test_dt_limit_must_be_ordered():
    with pytest.raises(ValueError, match="dt_limit"):
        ssd_chunked_scan(**make_inputs(), chunk_size=4, dt_limit=(1.0, 0.5))
