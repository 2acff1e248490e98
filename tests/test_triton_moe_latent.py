"""The Triton `moe.experts` grouped GEMM (kernels/moe_experts/triton.py) at the widths of a latent
MoE, where the experts read and write rows of `moe_latent_size` channels instead of the hidden
size, and a latent, group-routed MoE layer bound to it against the same layer bound to eager.

On CPU the kernels run under Triton's interpreter (16 rows x 32 columns x 16 deep tiles there):
latent widths of 12 (below one tile in both N and K) and 40 (one full K tile and a partial one,
a full and a partial N tile) exercise the masked edges that the 32-wide hidden size of
tests/test_triton_grouped_gemm.py does not. References and tolerances are that file's (float32:
rtol/atol 1e-5, sums of at most 96 products in another order; bfloat16: 2-ulp rtol 1.6e-2,
atol 1e-2 for sums near zero).
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_config
from kernel_checks import DEVICE, TOLERANCE, require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from test_triton_grouped_gemm import (  # noqa: E402
    ACTIVATIONS,
    BF16_TOLERANCE,
    UNEVEN,
    expert_inputs,
    outputs_and_grads,
    reference_experts,
)

from megatron_hybrid.kernels.moe_experts import triton as triton_grouped_gemm  # noqa: E402
from megatron_hybrid.kernels.registry import eager_kernels, resolve_kernels  # noqa: E402
from megatron_hybrid.layers.moe import MoELayer  # noqa: E402

FFN = 48


@pytest.mark.parametrize("latent", [12, 40])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_experts_at_latent_widths_match_the_reference(dtype, activation, latent):
    inputs = expert_inputs(UNEVEN, activation, dtype, hidden=latent, ffn=FFN)
    got = outputs_and_grads(triton_grouped_gemm.experts, *inputs, activation)
    x, counts, fc1, fc2 = inputs
    want = outputs_and_grads(
        reference_experts,
        x.double(),
        counts,
        fc1.double(),
        fc2.double(),
        activation,
        dtype == torch.bfloat16,
    )
    tolerance = BF16_TOLERANCE if dtype == torch.bfloat16 else TOLERANCE[dtype]
    for name, g, w in zip(["y", "dx", "dfc1", "dfc2"], got, want, strict=True):
        assert g.shape == w.shape and g.shape[-1] in (latent, FFN), name
        torch.testing.assert_close(g, w.to(g.dtype), **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_latent_group_routed_moe_with_triton_experts_matches_eager(activation):
    config = small_config(
        "E",
        num_moe_experts=8,
        moe_router_topk=4,
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_score_function="sigmoid",
        moe_latent_size=12,
        moe_shared_expert_intermediate_size=20,
        activation=activation,
    )
    triton_kernels = resolve_kernels({"moe.experts": "triton"}, "eager", DEVICE)
    eager, triton = (
        MoELayer(config, kernels).to(DEVICE) for kernels in (eager_kernels(), triton_kernels)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    triton.load_state_dict(eager.state_dict())
    x = torch.randn(3, 11, config.hidden_size, generator=generator).to(DEVICE)
    grad_out = torch.randn(x.shape, generator=generator).to(DEVICE)

    def outputs_and_gradients(layer):
        x_leaf = x.clone().requires_grad_()
        y = layer(x_leaf)
        leaves = [x_leaf, *layer.parameters()]
        return [y, *torch.autograd.grad(y, leaves, grad_out)]

    names = ["y", "dx", *(n for n, _ in eager.named_parameters())]
    got, want = outputs_and_gradients(triton), outputs_and_gradients(eager)
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(
            g, w, **TOLERANCE[torch.float32], msg=lambda m, n=name: f"{n}: {m}"
        )


# A latent width that is no multiple of the GPU tiles (64/128): the masked edges at real sizes.
# Tolerances as the real-shape test of tests/test_triton_grouped_gemm.py.
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_experts_at_a_real_latent_width_on_gpu(activation):
    generator = torch.Generator().manual_seed(0)
    expert = torch.randint(0, 8, (32768,), generator=generator)
    counts = torch.bincount(expert, minlength=8).tolist()
    inputs = expert_inputs(counts, activation, torch.bfloat16, spare_rows=0, hidden=1000, ffn=1856)
    got = outputs_and_grads(triton_grouped_gemm.experts, *inputs, activation)
    x, counts_t, fc1, fc2 = inputs
    want = outputs_and_grads(
        reference_experts, x.float(), counts_t, fc1.float(), fc2.float(), activation, True
    )
    for name, g, w in zip(["y", "dx", "dfc1", "dfc2"], got, want, strict=True):
        tolerance = dict(rtol=1.6e-2, atol=w.abs().max().item() * 2**-8)
        torch.testing.assert_close(g, w.to(g.dtype), **tolerance, msg=lambda m, n=name: f"{n}: {m}")
