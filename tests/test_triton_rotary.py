"""Triton rotary embedding (kernels/rotary/triton.py) against its eager reference
(kernels/rotary/eager.py::rotary, the registry's `rotary=eager`): output and the
gradients of x, cos and sin, float32 and bfloat16, on attention's strided q and k views, plus an
attention layer bound to it, torch.library.opcheck and torch.compile.

On CPU the kernels run under Triton's interpreter with tiny shapes: head_dim 12 (half 6, a
masked block of 8) and 70 positions (two time blocks of 64, the second partial).

Reference and tolerances: tests/kernel_checks.py. Each output or x-gradient entry is two float32
products and a sum (y1 = x1 c1 - x2 s1; the kernel may fuse it into one FMA, eager rounds each
product), so float32 agrees within ~1 ulp: rtol/atol 1e-5. The cos and sin gradients are float32
sums over batch x heads (6 terms here) in another order: the same bound holds. bfloat16: one
rounding of nearly the same float32 value: the 2-ulp rtol 1.6e-2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_config
from kernel_checks import (
    DEVICE,
    assert_matches,
    leaf,
    outputs_and_grads,
    randn,
    require_triton_kernels,
)

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels.registry import resolve_kernels  # noqa: E402
from megatron_hybrid.kernels.rotary import eager as eager_rotary  # noqa: E402
from megatron_hybrid.kernels.rotary import triton as triton_rotary  # noqa: E402
from megatron_hybrid.layers.attention import SelfAttention  # noqa: E402
from megatron_hybrid.layers.rotary import rotary_cos_sin  # noqa: E402

BATCH, HEADS, SEQ, HEAD_DIM = 2, 3, 70, 12
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


def tables(seq=SEQ, dim=HEAD_DIM, dtype=torch.float32):
    return rotary_cos_sin(seq, dim, 10000.0, torch.device(DEVICE), dtype)


def q_view(packed: torch.Tensor, heads=HEADS, dim=HEAD_DIM) -> torch.Tensor:
    """(B, heads, T, D) as attention's q: a transposed view of (B, T, heads, D) rows."""
    batch, seq = packed.shape[:2]
    return packed[..., : heads * dim].view(batch, seq, heads, dim).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_matches_eager_on_attention_layout(dtype):
    # x in attention's memory layout (B, T, heads, D) seen as (B, heads, T, D); cos and sin are
    # inputs too, so their gradients are checked.
    x = randn(BATCH, SEQ, HEADS, HEAD_DIM, dtype=dtype, scale=2.0).transpose(1, 2)
    cos, sin = tables()
    assert_matches(triton_rotary.rotary, eager_rotary.rotary, [x, cos, sin], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_matches_eager_with_tables_in_x_dtype_and_other_ranks(dtype):
    cos, sin = tables(seq=5, dim=8, dtype=dtype)
    for shape in [(5, 8), (4, 5, 8), (2, 2, 3, 5, 8)]:
        assert_matches(
            triton_rotary.rotary,
            eager_rotary.rotary,
            [randn(*shape, dtype=dtype), cos, sin],
            dtype=dtype,
        )


def test_rotary_reads_strided_q_and_k_in_place_and_keeps_their_layout():
    # k: a (B, T, groups, D) slice of the packed projection, not dense; the gradient flows back
    # into the packed tensor.
    packed = leaf(randn(BATCH, SEQ, HEADS * HEAD_DIM + 7))
    cos, sin = tables()
    y = triton_rotary.rotary(q_view(packed), cos, sin)
    assert y.stride() == q_view(torch.empty(BATCH, SEQ, HEADS * HEAD_DIM)).stride()
    out, (grad,) = outputs_and_grads(lambda p: triton_rotary.rotary(q_view(p), cos, sin), [packed])
    out_ref, (grad_ref,) = outputs_and_grads(
        lambda p: eager_rotary.rotary(q_view(p), cos, sin), [packed]
    )
    torch.testing.assert_close(out[0], out_ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope_groups", [1, 2, 4])
def test_attention_with_triton_rotary_matches_eager_attention(rope_groups):
    config = small_config("*", num_query_groups=rope_groups, position_embedding_type="rope")
    kernels = resolve_kernels({"rotary": "triton"}, "eager", DEVICE)
    torch.manual_seed(0)
    eager = SelfAttention(config).to(DEVICE)
    fast = SelfAttention(config, kernels).to(DEVICE)
    fast.load_state_dict(eager.state_dict())
    x = randn(2, 9, config.hidden_size)
    out_f, grads_f = outputs_and_grads(fast, [x])
    out_e, grads_e = outputs_and_grads(eager, [x])
    torch.testing.assert_close(out_f[0], out_e[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads_f[0], grads_e[0], rtol=1e-5, atol=1e-5)


def test_rotary_rejects_odd_head_dim_and_mismatched_tables():
    cos, sin = tables(seq=4, dim=8)
    with pytest.raises(ValueError, match="D even"):
        triton_rotary.rotary(randn(1, 4, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="cos has shape"):
        triton_rotary.rotary(randn(1, 5, 8), cos, sin)


def test_rotary_opcheck():
    cos, sin = tables(seq=5, dim=8)
    x = randn(2, 5, 3, 8).transpose(1, 2)  # strided
    torch.library.opcheck(triton_rotary._rotary_op, (leaf(x), cos, sin))
    torch.library.opcheck(triton_rotary._rotary_op, (leaf(x), leaf(cos), leaf(sin)))
    torch.library.opcheck(triton_rotary._rotary_backward_op, (randn(2, 3, 5, 8, seed=1), cos, sin))


def test_rotary_compiles_without_graph_breaks():
    cos, sin = tables(seq=5, dim=8)

    def rotate_both(q, k):
        return triton_rotary.rotary(q, cos, sin), triton_rotary.rotary(k, cos, sin)

    compiled = torch.compile(rotate_both, fullgraph=True, backend="aot_eager")
    inputs = [randn(2, 3, 5, 8), randn(2, 1, 5, 8, seed=1)]
    out_c, grads_c = outputs_and_grads(compiled, inputs)
    out_e, grads_e = outputs_and_grads(rotate_both, inputs)
    for c, e in zip((*out_c, *grads_c), (*out_e, *grads_e), strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)  # same kernels, same order


def test_registry_binds_triton_rotary():
    kernels = resolve_kernels({"rotary": "triton"}, "eager", DEVICE)
    assert kernels.rotary is triton_rotary.rotary


# -- real shape on GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_matches_eager_at_a_real_shape_on_gpu(dtype):
    # 4 x 4096 tokens, 32 heads of 128 in attention's layout. Each entry is the same two-term
    # formula as at tiny shapes; only the cos/sin gradients sum more terms (4 x 32 = 128), whose
    # float32 reordering stays within the float32 tolerance for these O(10) sums.
    x = randn(4, 4096, 32, 128, dtype=dtype).transpose(1, 2)
    cos, sin = tables(seq=4096, dim=128)
    assert_matches(
        triton_rotary.rotary,
        eager_rotary.rotary,
        [x, cos, sin],
        dtype=dtype,
        tolerance={
            torch.float32: dict(rtol=1e-5, atol=1e-4),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
        },
    )
