"""Triton SSD chunked scan (kernels/ssd/triton.py) against the eager reference
(kernels/ssd/eager.py, itself tested against the step-by-step recurrence): y, the final states and
the gradients of every input (x, dt, A, B, C, D, dt_bias, initial_states), float32 and bfloat16,
D per head and per (head, dim), dt_bias + softplus + dt_limit, initial and final states, seqlen
not a multiple of chunk_size, ngroups < nheads, strided views; plus opcheck and torch.compile.

On CPU the kernels run under Triton's interpreter with tiny shapes: 16-position tiles there, so
chunk_size 32 spans two tiles of a chunk, chunk_size 12 pads a chunk to 16 positions, and
headdim 6 / dstate 5 pad to 16. With a GPU the same tests run compiled, and the `gpu` tests add
real shapes.

Reference: the eager op in float64 on the same input values (bfloat16 inputs upcast exactly),
under random output and final-state gradients. Inputs are random and never zero; A < 0.

Tolerances, |triton - reference| <= rtol |reference| + atol_scale max|reference| per tensor:
- float32 (rtol 1e-5, atol_scale 1e-6): the kernels sum the same products in float32 in another
  order, and take exp(a_l - a_s) from differences of in-chunk cumsums where the reference uses
  segment sums; each element is a float32 sum of at most a few hundred terms here, so it is off
  by a few ulp of its largest terms. Measured: max error <= 1e-6 max|ref| (ddt, dB, dC, which sum
  the most terms), <= 7e-8 max|ref| beyond rtol; the absolute part, scaled by the tensor's
  largest entry, covers entries that are small because their terms cancel (15x margin).
- bfloat16 (x, B, C bf16; rtol 2**-6, atol_scale 5e-3): y, dx, dB, dC are rounded once to bf16
  (<= 1 ulp = 2**-7 relative under the interpreter, which truncates; half that on GPU), which
  rtol = 2 ulp covers. As in mamba_ssm, the matmuls take bf16 operands, so float32 intermediates
  (scores, states, state gradients) are rounded to bf16 first: each term of a sum carries up to
  2**-8 (2**-7 truncating) relative error, which is absolute error against the terms' scale, not
  the element's. Measured: <= 1.2e-3 max|ref| beyond rtol; atol_scale 5e-3 keeps a 4x margin.
  The float32 tests above are the precise check of the math; these check the half-precision path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, leaf, randn, require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.registry import resolve_kernels  # noqa: E402
from megatron_hybrid.kernels.ssd import triton as triton_ssd  # noqa: E402
from megatron_hybrid.kernels.ssd.eager import ssd_chunked_scan as eager_ssd  # noqa: E402

TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol_scale=1e-6),
    torch.bfloat16: dict(rtol=2**-6, atol_scale=5e-3),
}
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def ssd_inputs(
    batch,
    seqlen,
    nheads,
    headdim,
    ngroups,
    dstate,
    *,
    dtype=torch.float32,
    dt_dtype=torch.float32,
    D=None,
    dt_bias=False,
    initial=False,
    packed=False,
    seed=0,
):
    """Random never-zero inputs as a Mamba2 layer makes them: x, B, C in `dtype` (with `packed`,
    strided views into one (batch, seqlen, channels) buffer, as the layer's conv output is split),
    raw dt with dt_bias (else positive dt), A < 0."""
    inputs = {}
    if packed:
        widths = [nheads * headdim, ngroups * dstate, ngroups * dstate]
        xBC = randn(batch, seqlen, sum(widths) + 3, dtype=dtype, seed=seed)[..., 3:]
        x, B, C = xBC.split(widths, dim=-1)
        inputs.update(
            x=x.unflatten(-1, (nheads, headdim)),
            B=B.unflatten(-1, (ngroups, dstate)),
            C=C.unflatten(-1, (ngroups, dstate)),
        )
    else:
        inputs.update(
            x=randn(batch, seqlen, nheads, headdim, dtype=dtype, seed=seed),
            B=randn(batch, seqlen, ngroups, dstate, dtype=dtype, seed=seed + 1),
            C=randn(batch, seqlen, ngroups, dstate, dtype=dtype, seed=seed + 2),
        )
    dt = randn(batch, seqlen, nheads, seed=seed + 3)
    inputs["dt"] = (dt if dt_bias else F.softplus(dt)).to(dt_dtype)
    inputs["A"] = -torch.exp(randn(nheads, seed=seed + 4))
    if D == "per_head":
        inputs["D"] = randn(nheads, seed=seed + 5)
    elif D == "per_channel":
        inputs["D"] = randn(nheads, headdim, seed=seed + 5)
    if dt_bias:
        inputs["dt_bias"] = randn(nheads, seed=seed + 6)
    if initial:
        inputs["initial_states"] = randn(batch, nheads, headdim, dstate, seed=seed + 7)
    return {name: inputs[name] for name in NAMES if name in inputs}


def run_ssd(fn, inputs, chunk_size, **options):
    """y, final states, and the gradient of every input under random output gradients."""
    leaves = {name: leaf(t) for name, t in inputs.items()}
    y, final = fn(**leaves, chunk_size=chunk_size, return_final_states=True, **options)
    loss = (y.double() * randn(*y.shape, seed=100).double()).sum() + (
        final.double() * randn(*final.shape, seed=101).double()
    ).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {
        "y": y,
        "final_states": final,
        **{f"d{name}": g for name, g in zip(leaves, grads, strict=True)},
    }


def assert_matches_eager(inputs, chunk_size, dtype, tolerance=TOLERANCE, overrides=None, **options):
    """Outputs and gradients within `tolerance[dtype]` (or `overrides[name]`) of eager's."""
    got = run_ssd(triton_ssd.ssd_chunked_scan, inputs, chunk_size, **options)
    want = run_ssd(eager_ssd, {k: v.double() for k, v in inputs.items()}, chunk_size, **options)
    expected_dtypes = {
        "y": inputs["x"].dtype,
        "final_states": torch.float32,
        **{f"d{name}": t.dtype for name, t in inputs.items()},
    }
    for name, t in got.items():
        assert t.dtype == expected_dtypes[name] and t.shape == want[name].shape, name
        assert_close_scaled(t, want[name], name, **(overrides or {}).get(name, tolerance[dtype]))


def assert_close_scaled(t, r, name, rtol, atol_scale):
    """|t - r| <= rtol |r| + atol_scale max|r| elementwise."""
    torch.testing.assert_close(
        t.double(),
        r,
        rtol=rtol,
        atol=atol_scale * r.abs().max().item(),
        msg=lambda m: f"{name}: {m}",
    )


# -- float32 ---------------------------------------------------------------------------------------


def test_matches_eager_in_the_mamba2_layer_configuration():
    # D per head, dt_bias + softplus + a dt_limit that clamps some steps at both ends, strided
    # views of one packed buffer, initial and final states, 24 steps in chunks of 16 (the last
    # one partial), two heads per group.
    inputs = ssd_inputs(2, 24, 4, 8, 2, 8, D="per_head", dt_bias=True, initial=True, packed=True)
    assert not inputs["x"].is_contiguous()
    dt = F.softplus(inputs["dt"] + inputs["dt_bias"])
    dt_limit = (0.2, 1.5)
    assert (dt < dt_limit[0]).any() and (dt > dt_limit[1]).any()
    assert_matches_eager(inputs, 16, torch.float32, dt_softplus=True, dt_limit=dt_limit)


def test_matches_eager_with_chunks_of_two_tiles_and_per_channel_D():
    # chunk_size 32 = two 16-position tiles under the interpreter; headdim 6 and dstate 5 pad to
    # 16; one group for all heads; no dt processing, no initial state.
    inputs = ssd_inputs(1, 40, 4, 6, 1, 5, D="per_channel")
    assert_matches_eager(inputs, 32, torch.float32)


def test_matches_eager_with_chunks_of_four_tiles():
    # chunk_size 64 = four 16-position tiles under the interpreter (the last chunk partial):
    # the backward's source tiles see tiles below the diagonal after others, so the gradient of
    # dt * A sums carried columns as well as the tile's own (kernels/ssd/triton_bwd.py).
    inputs = ssd_inputs(1, 100, 2, 8, 1, 8, dt_bias=True)
    assert_matches_eager(inputs, 64, torch.float32, dt_softplus=True)


def test_matches_eager_with_a_chunk_size_that_is_not_a_power_of_two():
    # chunk_size 12 pads each chunk to 16 positions; one head per group; no D.
    inputs = ssd_inputs(2, 30, 2, 8, 2, 8, dt_bias=True, initial=True)
    assert_matches_eager(inputs, 12, torch.float32, dt_softplus=True)


def test_returns_only_y_without_final_states():
    # One chunk longer than the sequence.
    inputs = ssd_inputs(1, 20, 2, 8, 1, 8, D="per_head")
    y = triton_ssd.ssd_chunked_scan(**inputs, chunk_size=32)
    assert isinstance(y, torch.Tensor)
    # With no gradient flowing into the final states, the gradients are those of y alone.
    leaves = {name: leaf(t) for name, t in inputs.items()}
    grads = torch.autograd.grad(
        triton_ssd.ssd_chunked_scan(**leaves, chunk_size=32).sum(), list(leaves.values())
    )
    leaves_ref = {name: leaf(t.double()) for name, t in inputs.items()}
    y_ref = eager_ssd(**leaves_ref, chunk_size=32)
    grads_ref = torch.autograd.grad(y_ref.sum(), list(leaves_ref.values()))
    assert_close_scaled(y, y_ref, "y", **TOLERANCE[torch.float32])
    for name, g, r in zip(inputs, grads, grads_ref, strict=True):
        assert_close_scaled(g, r, f"d{name}", **TOLERANCE[torch.float32])


# -- bfloat16 ------------------------------------------------------------------------------------


def test_matches_eager_with_bf16_x_B_C_and_float32_dt():
    # The benchmark's case and the layer's under bf16 autocast-free training: bf16 activations,
    # float32 dt, A, D and dt_bias; chunks of two tiles, the last one partial.
    inputs = ssd_inputs(
        1, 40, 4, 8, 2, 8, dtype=torch.bfloat16, D="per_head", dt_bias=True, initial=True
    )
    assert_matches_eager(inputs, 32, torch.bfloat16, dt_softplus=True, dt_limit=(0.0, 2.0))


def test_matches_eager_with_every_input_in_bf16():
    inputs = ssd_inputs(
        2,
        24,
        4,
        8,
        2,
        8,
        dtype=torch.bfloat16,
        dt_dtype=torch.bfloat16,
        D="per_channel",
        dt_bias=True,
        initial=True,
        packed=True,
    )
    inputs = {name: t.to(torch.bfloat16) for name, t in inputs.items()}
    assert_matches_eager(inputs, 16, torch.bfloat16, dt_softplus=True)


# -- torch.library, torch.compile, registry, errors -----------------------------------------------


def tiny_op_args(with_optional: bool):
    inputs = ssd_inputs(
        1,
        10,
        2,
        4,
        1,
        4,
        D="per_head" if with_optional else None,
        dt_bias=with_optional,
        initial=with_optional,
    )
    return (
        inputs["x"],
        inputs["dt"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        8,
        inputs.get("D"),
        inputs.get("dt_bias"),
        with_optional,
        0.0,
        math.inf,
        inputs.get("initial_states"),
    )


def test_ssd_opcheck():
    args = tiny_op_args(with_optional=True)
    torch.library.opcheck(
        triton_ssd._ssd_op, tuple(leaf(a) if isinstance(a, torch.Tensor) else a for a in args)
    )
    dy, dfinal = randn(*args[0].shape, seed=9), randn(1, 2, 4, 4, seed=10)
    for op_args in (args, tiny_op_args(with_optional=False)):
        # The backward takes the forward's intermediates (dt, da_cs, cb, states) as inputs.
        intermediates = triton_ssd._ssd_op(*op_args)[2:]
        torch.library.opcheck(
            triton_ssd._ssd_backward_op,
            (dy, dfinal, *op_args, *intermediates),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_backward_fills_no_gradient_of_the_saved_intermediates():
    # The forward op returns the chunk states (and dt, its cumsum, CB) for the backward; they are
    # not differentiable outputs, so autograd must not zero-fill gradients for them (a pass over
    # the states-sized tensor per call).
    from torch.utils._python_dispatch import TorchDispatchMode

    inputs = ssd_inputs(1, 40, 4, 8, 2, 8, dt_bias=True)
    leaves = {name: leaf(t) for name, t in inputs.items()}
    y = triton_ssd.ssd_chunked_scan(**leaves, chunk_size=16, dt_softplus=True)
    states_shape = (1, 3, 4, 8, 8)  # (batch, chunks, heads, headdim, dstate)
    filled = []

    class RecordFills(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__
            if (
                ("zero" in name or "fill" in name or "full" in name)
                and isinstance(out, torch.Tensor)
                and tuple(out.shape) == states_shape
            ):
                filled.append(name)
            return out

    with RecordFills():
        torch.autograd.grad(y, list(leaves.values()), randn(*y.shape, seed=3))
    assert filled == []


def test_ssd_compiles_without_graph_breaks():
    inputs = ssd_inputs(1, 10, 2, 4, 1, 4, D="per_head", dt_bias=True)

    def layer(x, dt, A, B, C, D, dt_bias):
        return (
            triton_ssd.ssd_chunked_scan(x, dt, A, B, C, 8, D=D, dt_bias=dt_bias, dt_softplus=True)
            * 2.0
        )

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: no breaks
    got, want = (run_grads(fn, inputs) for fn in (compiled, layer))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def run_grads(fn, inputs):
    leaves = [leaf(t) for t in inputs.values()]
    y = fn(*leaves)
    return (y, *torch.autograd.grad((y * randn(*y.shape, seed=3)).sum(), leaves))


def test_registry_binds_triton_ssd():
    kernels = resolve_kernels({"ssd": "triton"}, "eager", DEVICE)
    assert kernels.impl("ssd") == "triton"
    assert kernels.ssd is triton_ssd.ssd_chunked_scan


def test_rejects_float64_and_bad_shapes_like_the_eager_op():
    inputs = ssd_inputs(1, 8, 2, 4, 1, 4)
    with pytest.raises(ValueError, match="x is torch.float64"):
        triton_ssd.ssd_chunked_scan(**{**inputs, "x": inputs["x"].double()}, chunk_size=4)
    with pytest.raises(ValueError, match=r"B has shape \(1, 8, 4\)"):
        triton_ssd.ssd_chunked_scan(**{**inputs, "B": inputs["B"][:, :, 0]}, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        triton_ssd.ssd_chunked_scan(**inputs, chunk_size=0)


# -- real shapes on GPU ----------------------------------------------------------------------------

# At real sizes every sum has more terms (chunks of 128-256 steps, headdim x dstate = 8192 state
# entries per head), so bf16-rounded intermediates leave errors a larger fraction of the largest
# entry; still a few bf16 ulp of the largest terms. dA_h sums dt * d(dt A) over every step of
# every sequence, and those terms cancel: below, sum |terms| is 20 to 26000 times |dA_h|
# (measured in float64), so bf16-rounded states and state gradients leave an error that is small
# against sum |terms| (measured on an H100: <= 1.8e-4 of it) but up to 4.5% of dA_h itself and
# 3.5% of max |dA|. It gets atol_scale 0.1; every other tensor passes with atol_scale 1e-2.
# (float32 matmuls are IEEE, so the float32 test keeps tolerances near the CPU ones.)
GPU_TOLERANCE = {
    torch.bfloat16: dict(rtol=2**-6, atol_scale=1e-2),
    torch.float32: dict(rtol=1e-4, atol_scale=1e-5),
}
GPU_BF16_DA = {"dA": dict(rtol=2**-6, atol_scale=0.1)}


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [128, 256])
def test_matches_eager_at_a_real_shape_in_bf16_on_gpu(chunk_size):
    # seqlen 2000: the last chunk is partial; 16 heads in 4 groups.
    inputs = ssd_inputs(
        2,
        2000,
        16,
        64,
        4,
        128,
        dtype=torch.bfloat16,
        D="per_head",
        dt_bias=True,
        initial=True,
        packed=True,
    )
    assert_matches_eager(
        inputs,
        chunk_size,
        torch.bfloat16,
        GPU_TOLERANCE,
        GPU_BF16_DA,
        dt_softplus=True,
        dt_limit=(0.0, 4.0),
    )


@pytest.mark.gpu
def test_matches_eager_at_a_real_shape_in_float32_on_gpu():
    inputs = ssd_inputs(1, 1000, 8, 64, 2, 128, D="per_channel", dt_bias=True, initial=True)
    assert_matches_eager(inputs, 128, torch.float32, GPU_TOLERANCE, dt_softplus=True)
