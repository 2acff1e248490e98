"""The Triton SSD's "chunk" backward (kernels/ssd/triton_bwd_chunk.py: dx per whole chunk and
head, dB with dCB summed over a group's heads first) against the eager op in float64 and against
the "split" backward (kernels/ssd/triton_bwd.py): the gradients of every input (x, dt, A, B, C,
D, dt_bias, initial_states), with dt_bias + softplus + dt_limit, grouped B/C, seqlen not a
multiple of chunk_size, chunks of several tiles and padded chunks, float32 and bfloat16.

Shapes, inputs and the eager comparison (with its tolerances and why they hold) are those of
tests/test_triton_ssd.py. The two backward variants compute the same float32 sums in another
order (and dB's CB part sums the heads before rounding to the matmul dtype rather than after),
so each is within the eager tolerance of the float64 reference; against each other they get the
same tolerance, which covers both sides' rounding. Measured here (interpreter): float32
|chunk - split| <= 2.9e-7 max|split| (dB, dD: summed in another order), 0 for y, dA, dC;
bfloat16, beyond rtol: dB 1.4e-3 max|dB| apart (chunk 2.1e-3 from float64 eager, split 1.8e-3)
against atol_scale 5e-3.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from test_triton_ssd import (  # noqa: E402
    GPU_BF16_DA,
    GPU_TOLERANCE,
    TOLERANCE,
    assert_close_scaled,
    assert_matches_eager,
    run_ssd,
    ssd_inputs,
)

from megatron_hybrid.kernels.ssd import triton as triton_ssd  # noqa: E402


def use_backward(monkeypatch, variant: str) -> None:
    monkeypatch.setattr(triton_ssd, "BWD_VARIANT", variant)


def results_of(monkeypatch, variant, inputs, chunk_size, **options):
    use_backward(monkeypatch, variant)
    return run_ssd(triton_ssd.ssd_chunked_scan, inputs, chunk_size, **options)


def assert_variants_agree(monkeypatch, inputs, chunk_size, tolerance, overrides=None, **options):
    """The chunk backward's gradients within `tolerance` of the split backward's."""
    split = results_of(monkeypatch, "split", inputs, chunk_size, **options)
    chunk = results_of(monkeypatch, "chunk", inputs, chunk_size, **options)
    for name, want in split.items():
        got = chunk[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close_scaled(
            got, want.double(), f"{name} (chunk vs split)", **(overrides or {}).get(name, tolerance)
        )


CASES = {
    # The Mamba2 layer's call: D per head, dt_bias + softplus + a dt_limit that clamps steps at
    # both ends, strided views of one packed buffer, initial and final states, two heads per
    # group; chunks of two 16-position tiles (under the interpreter), the last chunk partial.
    "layer": (
        dict(
            shape=(2, 40, 4, 8, 2, 8),
            D="per_head",
            dt_bias=True,
            initial=True,
            packed=True,
        ),
        32,
        dict(dt_softplus=True, dt_limit=(0.2, 1.5)),
    ),
    # chunk_size 12 pads each chunk to 16 positions; headdim 6 and dstate 5 pad to 16; D per
    # (head, dim); three heads in one group (the dB kernel's per-head tiles pad to four).
    "padded": (dict(shape=(1, 30, 3, 6, 1, 5), D="per_channel"), 12, {}),
    # chunk_size 64 = four tiles, two of the dx kernel's source tiles (each adding to dD): the
    # source tiles see several target tiles, so the gradient of dt * A sums carried columns as
    # well as the tile's own (per head: three heads in one group, padded to four in the dB
    # kernel's carries); dstate 24 pads to 32, two slices of the dx kernel's state term, the
    # second partly masked; seqlen 100 ends mid-chunk. Seed 3 keeps |A| <= 2.6: seed 0's third
    # head has A = -9.4, whose in-chunk cumsums over 64 steps grow so large that the shared
    # forward's decays (differences of them) lose float32 digits (y then misses the float32
    # tolerance by 5x, in either backward variant).
    "four_tiles": (
        dict(shape=(1, 100, 3, 8, 1, 24), D="per_head", dt_bias=True, seed=3),
        64,
        dict(dt_softplus=True),
    ),
}


def case_inputs(name, dtype=torch.float32):
    spec, chunk_size, options = CASES[name]
    spec = dict(spec)
    inputs = ssd_inputs(*spec.pop("shape"), dtype=dtype, **spec)
    return inputs, chunk_size, options


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunk_backward_matches_eager_in_float32(monkeypatch, case):
    inputs, chunk_size, options = case_inputs(case)
    use_backward(monkeypatch, "chunk")
    assert_matches_eager(inputs, chunk_size, torch.float32, **options)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunk_backward_matches_split_backward_in_float32(monkeypatch, case):
    inputs, chunk_size, options = case_inputs(case)
    assert_variants_agree(monkeypatch, inputs, chunk_size, TOLERANCE[torch.float32], **options)


def test_chunk_backward_with_dx_source_tiles_smaller_than_its_target_tiles(monkeypatch):
    # The dx kernel's own tiles run 32 source x 16 target positions under the interpreter; a
    # launch configuration may make them 16 x 32 (a target tile then starts below its source
    # tile's first row: the causal mask, not the loop bounds, must drop those entries).
    monkeypatch.setattr(
        triton_ssd, "_chunk_dx_tile", lambda sh, dim: min(sh.cp, {"m": 16, "k": 32}[dim])
    )
    inputs, chunk_size, options = case_inputs("four_tiles")
    assert_variants_agree(monkeypatch, inputs, chunk_size, TOLERANCE[torch.float32], **options)


def test_chunk_backward_matches_eager_and_split_in_bf16(monkeypatch):
    # bf16 x, B, C (bf16 matmul operands), float32 dt; both backward variants round their
    # float32 intermediates to bf16 before the matmuls, in different places for dB, so they
    # agree within the bf16 tolerance that each keeps against the float64 reference.
    inputs, chunk_size, options = case_inputs("layer", torch.bfloat16)
    use_backward(monkeypatch, "chunk")
    assert_matches_eager(inputs, chunk_size, torch.bfloat16, **options)
    assert_variants_agree(monkeypatch, inputs, chunk_size, TOLERANCE[torch.bfloat16], **options)


def test_backward_variant_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(triton_ssd.BWD_ENV, "chunk")
    assert triton_ssd._bwd_variant_from_env() == "chunk"
    monkeypatch.delenv(triton_ssd.BWD_ENV)
    assert triton_ssd._bwd_variant_from_env() == "split"  # the default until measured
    monkeypatch.setenv(triton_ssd.BWD_ENV, "fused")
    with pytest.raises(ValueError, match=r"MEGATRON_HYBRID_SSD_BWD='fused'.*'chunk', 'split'"):
        triton_ssd._bwd_variant_from_env()


# -- real shape on GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [128, 256])
def test_chunk_backward_matches_split_and_eager_at_a_real_shape_in_bf16_on_gpu(
    monkeypatch, chunk_size
):
    # tests/test_triton_ssd.py's real bf16 shape (16 heads in 4 groups, seqlen 2000: the last
    # chunk partial) and its GPU tolerances: each variant against float64 eager, and the two
    # against each other (dA's terms cancel, so its error is a larger fraction of |dA| there).
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
    options = dict(dt_softplus=True, dt_limit=(0.0, 4.0))
    use_backward(monkeypatch, "chunk")
    assert_matches_eager(inputs, chunk_size, torch.bfloat16, GPU_TOLERANCE, GPU_BF16_DA, **options)
    assert_variants_agree(
        monkeypatch, inputs, chunk_size, GPU_TOLERANCE[torch.bfloat16], GPU_BF16_DA, **options
    )
