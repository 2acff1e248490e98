"""Triton RMSNorm, gated grouped RMSNorm and fused residual-add + RMSNorm against their eager
references: forward and every gradient, float32 and bfloat16, plus torch.library.opcheck.

On CPU the kernels run under Triton's interpreter with tiny shapes; with a GPU the same tests
run compiled, and the `gpu` tests add real shapes.

Reference and tolerances: tests/kernel_checks.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import (
    DEVICE,
    assert_matches,
    leaf,
    outputs_and_grads,
    randn,
    require_triton_kernels,
    round_to_bfloat16,
)

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.norms import eager as eager_norms  # noqa: E402
from megatron_hybrid.kernels.norms import triton as triton_norms  # noqa: E402

EPS = 1e-5
# (activation dtype, weight dtype): pure float32, pure bf16, bf16 activations with float32
# weights (autocast), which the kernels read and write without casting either input.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp32", "bf16", "bf16-fp32weight"]


# -- RMSNorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_matches_eager(dtypes):
    dtype, wdtype = dtypes
    x, w = randn(2, 5, 48, dtype=dtype, scale=3.0), randn(48, dtype=wdtype, seed=1)
    assert_matches(triton_norms.rms_norm, eager_norms.rms_norm, [x, w], EPS, dtype=dtype)


def test_rms_norm_handles_widths_that_are_not_powers_of_two_and_strided_rows():
    # 3 x 40 rows of 36 channels out of a (.., 50) buffer: masked columns, row stride 50.
    x = randn(3, 40, 50)[..., 7:43]
    assert_matches(
        triton_norms.rms_norm,
        eager_norms.rms_norm,
        [x, randn(36, seed=1)],
        EPS,
        dtype=torch.float32,
    )


def test_rms_norm_opcheck():
    torch.library.opcheck(
        triton_norms._rms_norm_op, (leaf(randn(3, 16)), leaf(randn(16, seed=1)), EPS)
    )
    torch.library.opcheck(
        triton_norms._rms_norm_backward_op,
        (randn(3, 16, seed=2), randn(3, 16), randn(16, seed=1), EPS),
    )


# -- gated grouped RMSNorm ------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", [8, 12, 48])
def test_gated_rms_norm_matches_eager(dtypes, group_size):
    dtype, wdtype = dtypes
    x, z = randn(2, 5, 48, dtype=dtype, scale=2.0), randn(2, 5, 48, dtype=dtype, seed=1)
    w = randn(48, dtype=wdtype, seed=2)
    assert_matches(
        triton_norms.gated_rms_norm,
        eager_norms.gated_rms_norm,
        [x, z, w],
        group_size,
        EPS,
        dtype=dtype,
    )


def test_gated_rms_norm_reads_the_gate_in_place_from_a_packed_projection():
    # As in Mamba2: z is a slice of in_proj's packed output (row stride 80, not 32).
    packed = randn(2, 6, 80)
    x, z = randn(2, 6, 32, seed=3), packed[..., :32]
    assert_matches(
        triton_norms.gated_rms_norm,
        eager_norms.gated_rms_norm,
        [x, z, randn(32, seed=1)],
        16,
        EPS,
        dtype=torch.float32,
    )


def test_gated_rms_norm_rejects_a_group_size_that_does_not_divide_the_channels():
    with pytest.raises(ValueError, match="group_size 10 must divide the 48 channels"):
        triton_norms.gated_rms_norm(randn(2, 48), randn(2, 48), randn(48), 10, EPS)


def test_gated_rms_norm_opcheck():
    x, z, w = randn(3, 16), randn(3, 16, seed=1), randn(16, seed=2)
    torch.library.opcheck(triton_norms._gated_rms_norm_op, (leaf(x), leaf(z), leaf(w), 8, EPS))
    torch.library.opcheck(
        triton_norms._gated_rms_norm_backward_op, (randn(3, 16, seed=3), x, z, w, 8, EPS)
    )


# -- fused residual add + RMSNorm -----------------------------------------------------------------


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_add_rms_norm_matches_eager(dtypes):
    dtype, wdtype = dtypes
    x, residual = randn(2, 5, 48, dtype=dtype), randn(2, 5, 48, dtype=dtype, seed=1, scale=4.0)
    reference = add_rms_norm_reference if dtype == torch.bfloat16 else eager_norms.add_rms_norm
    assert_matches(
        triton_norms.add_rms_norm,
        reference,
        [x, residual, randn(48, dtype=wdtype, seed=2)],
        EPS,
        dtype=dtype,
    )


def add_rms_norm_reference(x, residual, weight, eps):
    """eager add_rms_norm on float32 copies of bfloat16 inputs, with the sum rounded to bfloat16
    as the kernel rounds it (gradient passed straight through): the kernel normalizes the sum as
    stored in the residual stream's dtype, as eager add_rms_norm does in bfloat16. A sum one ulp
    off would move the input gradient, `d(norm) + d(sum)`, by an ulp of its larger term."""
    total = residual + x
    total = total + (round_to_bfloat16(total).to(total.dtype) - total).detach()
    return eager_norms.rms_norm(total, weight, eps), total


def test_add_rms_norm_keeps_a_float32_residual_stream_under_bf16_activations():
    # Autocast: the mixer's output is bf16, the residual stream float32; both outputs are
    # float32 and the gradients come back in each input's own dtype.
    x, residual = randn(2, 5, 48, dtype=torch.bfloat16), randn(2, 5, 48, seed=1)
    normed, total = triton_norms.add_rms_norm(x, residual, randn(48, seed=2), EPS)
    assert normed.dtype == total.dtype == torch.float32
    assert_matches(
        triton_norms.add_rms_norm,
        eager_norms.add_rms_norm,
        [x, residual, randn(48, seed=2)],
        EPS,
        dtype=torch.float32,
    )


def test_add_rms_norm_opcheck():
    x, residual, w = randn(3, 16), randn(3, 16, seed=1), randn(16, seed=2)
    torch.library.opcheck(triton_norms._add_rms_norm_op, (leaf(x), leaf(residual), leaf(w), EPS))
    torch.library.opcheck(
        triton_norms._add_rms_norm_backward_op,
        (randn(3, 16, seed=3), randn(3, 16, seed=4), x + residual, w, EPS),
    )


# -- several row tiles per backward program ------------------------------------------------------

# A backward program walks its rows one tile after another while the next tile's loads are in
# flight; the shapes above give each program a single tile. 300 rows of 48 channels: on CPU
# 64-row tiles and two programs, so 3 and 2 tiles, the last one partial (asserted below).
# The weight gradient now sums 300 rows (kernel_checks.py's tolerances reason about <= 64
# terms): measured in float32 its entries stay within 5.4e-6 of the reference relative to
# themselves, inside rtol 1e-5; the other outputs sum 48 terms per row as before.
MANY_ROWS = 300


def backward_tiles_of_first_program(
    n_rows: int, group_size: int, channels: int, dtype: torch.dtype, gated: bool
) -> int:
    """Row tiles the first backward program walks, by the launcher's own arithmetic."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_m, _, _, _, rows_per_program = triton_norms._backward_launch(
        torch.device(DEVICE), n_rows, group_size, channels // group_size, itemsize, gated
    )
    return math.ceil(min(rows_per_program, n_rows) / block_m)


def many_rows_case(norm: str, dtype: torch.dtype):
    """(triton function, eager reference, inputs, extra arguments) for MANY_ROWS rows."""
    x = randn(MANY_ROWS, 48, dtype=dtype, scale=2.0)
    w = randn(48, dtype=dtype, seed=1)
    if norm == "rms":
        return triton_norms.rms_norm, eager_norms.rms_norm, [x, w], (EPS,)
    if norm == "gated":
        z = randn(MANY_ROWS, 48, dtype=dtype, seed=2)
        return triton_norms.gated_rms_norm, eager_norms.gated_rms_norm, [x, z, w], (16, EPS)
    residual = randn(MANY_ROWS, 48, dtype=dtype, seed=3, scale=4.0)
    reference = add_rms_norm_reference if dtype == torch.bfloat16 else eager_norms.add_rms_norm
    return triton_norms.add_rms_norm, reference, [x, residual, w], (EPS,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", ["rms", "add_rms", "gated"])
def test_norms_match_eager_with_several_row_tiles_per_backward_program(norm, dtype):
    fn, reference, inputs, args = many_rows_case(norm, dtype)
    group_size = args[0] if norm == "gated" else 48
    if DEVICE == "cpu":  # on a GPU the real-shape test below walks several tiles per program
        tiles = backward_tiles_of_first_program(MANY_ROWS, group_size, 48, dtype, norm == "gated")
        assert tiles >= 3
    assert_matches(fn, reference, inputs, *args, dtype=dtype)


# -- torch.compile --------------------------------------------------------------------------------


def test_norms_compile_without_graph_breaks():
    def block(x, z, residual, w):
        normed, total = triton_norms.add_rms_norm(x, residual, w, EPS)
        return triton_norms.gated_rms_norm(normed, z, w, 8, EPS), triton_norms.rms_norm(
            total, w, EPS
        )

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: no breaks
    inputs = [randn(2, 3, 16), randn(2, 3, 16, seed=1), randn(2, 3, 16, seed=2), randn(16, seed=3)]
    out_c, grads_c = outputs_and_grads(compiled, inputs)
    out_e, grads_e = outputs_and_grads(block, inputs)
    for c, e in zip((*out_c, *grads_c), (*out_e, *grads_e), strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)  # same kernels, same order


# -- real shapes on GPU ---------------------------------------------------------------------------

# At real widths the sums have thousands of terms and the weight gradient sums 8192 rows, so
# its entries reach ~350 and their reordering error scales with that, not with each entry.
# Measured on an H200 in float32: every output and gradient within 2.5e-7 of its tensor's
# largest magnitude (7.6e-5 absolute in the weight gradients); atol 5e-4 leaves 6x margin.
# bfloat16 keeps the 2-ulp rtol; its float32 weight gradients get the same absolute margin.
GPU_TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=5e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norms_match_eager_at_real_shapes_on_gpu(dtype):
    # Nemotron-H-8B-like: hidden 4096, Mamba d_inner 8192 in 8 groups, 2 x 4096 tokens.
    x, residual = randn(2, 4096, 4096, dtype=dtype), randn(2, 4096, 4096, dtype=dtype, seed=1)
    w = randn(4096, seed=2)
    assert_matches(
        triton_norms.rms_norm,
        eager_norms.rms_norm,
        [x, w],
        EPS,
        dtype=dtype,
        tolerance=GPU_TOLERANCE,
    )
    reference = add_rms_norm_reference if dtype == torch.bfloat16 else eager_norms.add_rms_norm
    assert_matches(
        triton_norms.add_rms_norm,
        reference,
        [x, residual, w],
        EPS,
        dtype=dtype,
        tolerance=GPU_TOLERANCE,
    )
    y, z = randn(2, 4096, 8192, dtype=dtype, seed=3), randn(2, 4096, 8192, dtype=dtype, seed=4)
    assert_matches(
        triton_norms.gated_rms_norm,
        eager_norms.gated_rms_norm,
        [y, z, randn(8192, seed=5)],
        1024,
        EPS,
        dtype=dtype,
        tolerance=GPU_TOLERANCE,
    )
