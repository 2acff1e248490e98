"""The `triton` gated delta rule (kernels/gated_delta_rule/triton.py) against the eager op:
the output, the final state and the gradient of every input, with and without initial and final
states, for sequences that end inside a chunk; its registry entry (auto on CUDA: fla where it
runs, else triton), the custom ops under opcheck and torch.compile, and (marked gpu) the
Qwen3-Next shape in bf16 and float32.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py turns it on) at tiny
shapes: 2 key heads and 4 value heads of 16 / 32 (several value tiles of 16), or sizes that are
not powers of two (masked tiles)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gdn_reference import inputs, relative_error
from kernel_checks import DEVICE, require_triton_kernels

require_triton_kernels()  # skips this module where Triton kernels cannot run (with the reason)

from megatron_hybrid.kernels import registry as registry_module  # noqa: E402
from megatron_hybrid.kernels.gated_delta_rule import triton as triton_rule  # noqa: E402
from megatron_hybrid.kernels.gated_delta_rule.eager import (  # noqa: E402
    chunk_gated_delta_rule as eager_rule,
)
from megatron_hybrid.kernels.registry import (  # noqa: E402
    OPS,
    REGISTRY,
    KernelRegistry,
    resolve_kernels,
)

OP = "gated_delta_rule"
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state")
# Relative error, max |triton - eager| / max |eager|, per tensor. Both share every chunk-parallel
# op (prepare_chunks) and differ only in the summation order of the state's products (IEEE
# float32 dots, no TF32): each result carries a few float32 ulps (1.2e-7), and the recurrence
# does not amplify them (||k|| = 1, b < 1 and decays <= 1 keep it contractive). 1e-5 is the
# float32 bound the eager op itself is held to against the float64 recurrence.
FLOAT32_REL = 1e-5
# float64: the same sums in another order, rounded at 1.1e-16.
FLOAT64_REL = 1e-12
# bf16 q, k, v: the state's products take bf16 operands (W, Kt, the state and d rounded, 2^-9
# relative; 2^-8 under the CPU interpreter, which truncates), summed over 16-128 terms and carried
# over the chunks, and o and the bf16 gradients are rounded once more. Measured under the
# interpreter at the tiny shapes: at most 9.3e-3; fla's kernels, which round the same way, are
# held to 3e-2 against eager (tests/test_gated_delta_rule.py).
BF16_REL = 3e-2


def outputs_and_grads(rule, operands, state, dtype, chunk_size, final_state, device=DEVICE):
    """rule's (o, final_state) and the gradients of q, k, v, g, beta (and initial_state when
    `state` is given) under fixed random output gradients; missing results are None. q, k, v
    and beta in `dtype`, g and the state at least float32 (as the layer hands them over)."""
    wide = torch.promote_types(dtype, torch.float32)
    leaves = [t.to(device, wide if i == 3 else dtype) for i, t in enumerate(operands)]
    leaves = [t.requires_grad_() for t in leaves]
    s0 = None if state is None else state.to(device, wide).requires_grad_()
    o, final = rule(
        *leaves, initial_state=s0, output_final_state=final_state, chunk_size=chunk_size
    )
    gen = torch.Generator().manual_seed(11)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device)).sum()
    if final_state:
        dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(device)
        loss = loss + (final.double() * dfinal).sum()
    wrt = leaves + ([s0] if s0 is not None else [])
    grads = list(torch.autograd.grad(loss, wrt))
    return [o, final, *grads[:5], grads[5] if s0 is not None else None]


def assert_close_to_eager(sizes, chunk_size, dtype, with_state, final_state, tolerance, seed=0):
    """The triton rule's outputs and gradients within `tolerance` (relative to the largest
    value) of the eager op's on the same inputs."""
    batch, seqlen, key_heads, value_heads, key_dim, value_dim = sizes
    operands = inputs(*sizes, seed=seed)
    state = None
    if with_state:
        gen = torch.Generator().manual_seed(seed + 1)
        shape = (batch, value_heads, key_dim, value_dim)
        state = torch.randn(shape, generator=gen, dtype=torch.float64)
    args = (operands, state, dtype, chunk_size, final_state)
    got = outputs_and_grads(triton_rule.chunk_gated_delta_rule, *args)
    want = outputs_and_grads(eager_rule, *args)
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert (g is None) == (w is None), name
        if w is None:
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert relative_error(g, w.double()) < tolerance, name


# -- against the eager op -------------------------------------------------------------------------

# 100 positions end inside a chunk of 16 (7 chunks) and of 32 (4 chunks).
SIZES = (2, 100, 2, 4, 16, 32)


@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize(
    "with_state, final_state", [(False, False), (False, True), (True, False), (True, True)]
)
def test_matches_eager_in_float32(chunk_size, with_state, final_state):
    assert_close_to_eager(SIZES, chunk_size, torch.float32, with_state, final_state, FLOAT32_REL)


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_matches_eager_in_float64(chunk_size):
    assert_close_to_eager(SIZES, chunk_size, torch.float64, True, True, FLOAT64_REL, seed=1)


def test_matches_eager_with_sizes_that_are_not_powers_of_two():
    # Chunks of 12 in tiles of 16 positions, key_dim 12 and value_dim 20 padded the same way:
    # every masked row and column must stay out of the state.
    sizes = (1, 30, 1, 3, 12, 20)
    assert_close_to_eager(sizes, 12, torch.float64, True, True, FLOAT64_REL, seed=2)


def test_matches_eager_with_bf16_inputs():
    assert_close_to_eager(SIZES, 16, torch.bfloat16, True, True, BF16_REL, seed=3)


@pytest.mark.parametrize(
    "q_k_v, compute, dots",
    [
        ((torch.bfloat16,) * 3, torch.float32, torch.bfloat16),  # the layer under bf16 autocast
        ((torch.bfloat16, torch.bfloat16, torch.float32), torch.float32, torch.float32),
        ((torch.float32,) * 3, torch.float32, torch.float32),
        ((torch.float64,) * 3, torch.float64, torch.float64),
    ],
    ids=str,
)
def test_products_take_the_half_dtype_only_when_q_k_and_v_share_it(q_k_v, compute, dots):
    q, k, v = (torch.zeros(1, dtype=dtype) for dtype in q_k_v)
    assert triton_rule._dot_dtype(q, k, v, compute) == dots


def test_half_precision_inputs_compute_in_float32_and_return_their_dtype():
    q, k, v, g, beta = (t.bfloat16() for t in inputs(1, 20, 1, 2, 16, 16, seed=3))
    o, final = triton_rule.chunk_gated_delta_rule(
        *(t.to(DEVICE) for t in (q, k, v, g.float(), beta)), output_final_state=True, chunk_size=16
    )
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32


def test_wrong_arguments_are_named_like_the_eager_op():
    q, k, v, g, beta = (t.float().to(DEVICE) for t in inputs(1, 5, 2, 4, 16, 16))
    with pytest.raises(ValueError, match=r"gated_delta_rule=triton: g has shape \(1, 5, 3\)"):
        triton_rule.chunk_gated_delta_rule(q, k, v, g[..., :3], beta)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        triton_rule.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match=r"gated_delta_rule \(triton\): v is torch.int64"):
        triton_rule.chunk_gated_delta_rule(q, k, v.long(), g, beta)


# -- torch.library and torch.compile --------------------------------------------------------------


def recurrence_args(seed=4):
    """The recurrence op's operands for 3 programs, 2 chunks of 16 positions, key_dim 16,
    value_dim 24."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.3):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)

    decay = torch.rand(3, 2, generator=gen).to(DEVICE)
    return randn(3, 2, 16, 24), randn(3, 2, 16, 16), randn(3, 2, 16, 16), decay, randn(3, 16, 24)


@pytest.mark.parametrize("dot_dtype", [torch.float32, torch.bfloat16])
def test_recurrence_opcheck(dot_dtype):
    args = (*(t.requires_grad_() for t in recurrence_args()), dot_dtype)
    torch.library.opcheck(triton_rule._recurrence_op, args)
    D, H, final = triton_rule._recurrence_op(*recurrence_args(), dot_dtype)
    grads = (torch.randn_like(D), torch.randn_like(H), torch.randn_like(final))
    _, W, k_end, decay, _ = recurrence_args()
    torch.library.opcheck(
        triton_rule._recurrence_backward_op,
        (*grads, W, k_end, decay, dot_dtype),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_compiles_without_graph_breaks():
    operands = [t.float().to(DEVICE) for t in inputs(1, 40, 1, 2, 16, 16, seed=5)]

    def layer(q, k, v, g, beta):
        o, _ = triton_rule.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
        return o * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: no breaks
    results = []
    for fn in (compiled, layer):
        leaves = [t.clone().requires_grad_() for t in operands]
        o = fn(*leaves)
        results.append((o, *torch.autograd.grad(o.sum(), leaves)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- the registry ---------------------------------------------------------------------------------


def registry_with_fla(fla_function) -> KernelRegistry:
    """The built-in registry with fla's entry (its priority and environment check) pointing at
    `fla_function`, as if fla-core were installed."""
    registry = KernelRegistry(OPS)
    for op in OPS:
        for impl in REGISTRY.implementations(op).values():
            if (op, impl.name) == (OP, "fla"):
                impl = dataclasses.replace(impl, target=fla_function, requires=())
            registry.register(impl)
    return registry


def as_if_on(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_auto_on_cuda_binds_triton_where_fla_is_not_installed(monkeypatch):
    as_if_on(monkeypatch, (9, 0))
    for module in ("fla", "fla.ops", "fla.ops.gated_delta_rule"):
        monkeypatch.setitem(sys.modules, module, None)  # as if fla-core were not installed
    kernels = resolve_kernels({}, "auto", "cuda")
    assert kernels.impl(OP) == "triton"
    assert kernels[OP] is triton_rule.chunk_gated_delta_rule
    assert "not fla for gated_delta_rule: gated_delta_rule=fla: cannot import" in (
        kernels.describe()
    )


def test_auto_on_cuda_binds_fla_where_it_is_installed_and_usable(monkeypatch):
    as_if_on(monkeypatch, (8, 0))

    def fla_rule(*args, **kwargs):
        raise AssertionError("not called")

    kernels = resolve_kernels({}, "auto", "cuda", registry_with_fla(fla_rule))
    assert kernels.impl(OP) == "fla" and kernels[OP] is fla_rule


def test_auto_on_cuda_binds_triton_where_fla_computes_wrong_gradients(monkeypatch):
    as_if_on(monkeypatch, (9, 0))
    problem = "fla's gated delta rule computes wrong gradients here"
    monkeypatch.setattr(registry_module, "fla_hopper_triton_problem", lambda *args: problem)

    def fla_rule(*args, **kwargs):
        raise AssertionError("not called")

    kernels = resolve_kernels({}, "auto", "cuda", registry_with_fla(fla_rule))
    assert kernels.impl(OP) == "triton"
    assert f"not fla for gated_delta_rule: {problem}" in kernels.describe()


def test_kernel_flag_binds_triton_and_a_model_on_it_matches_eager():
    from conftest import perturb_parameters, small_config

    from megatron_hybrid.kernels import KernelSettings, kernels_from_settings
    from megatron_hybrid.model import HybridModel

    settings = KernelSettings(kernel=["gated_delta_rule=triton"])
    kernels = kernels_from_settings(settings, DEVICE)
    assert kernels.impl(OP) == "triton" and kernels.choices[OP].how == "requested"
    config = small_config("[G-]G", linear_key_head_dim=16, linear_value_head_dim=16)
    # 70 positions: two chunks of the layer's 64, the second ending early.
    tokens = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(0))
    results = []
    for bound in (kernels, None):
        model = perturb_parameters(HybridModel(config, seed=3, kernels=bound)).to(DEVICE)
        logits = model(tokens.to(DEVICE))
        logits.float().pow(2).mean().backward()
        results.append([logits, *(p.grad for p in model.parameters())])
    # float32 throughout; the two differ only in the state's summation order (FLOAT32_REL).
    for got, want in zip(*results, strict=True):
        assert relative_error(got, want.double()) < FLOAT32_REL


# -- the Qwen3-Next shape on a GPU ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_eager_at_the_qwen3_next_shape_on_gpu(dtype):
    # 2 x 4096 tokens, 16 key heads and 32 value heads of 128, chunks of 64, initial and final
    # states; q, k, v and beta in dtype, g and the state in float32 (the layer's operands under
    # autocast). bf16: bf16 products (BF16_REL); float32: IEEE products (FLOAT32_REL, with 64
    # chunks of 64 positions and sums of 128 terms where the tiny shapes have 16: 1e-4).
    tolerance = BF16_REL if dtype == torch.bfloat16 else 1e-4
    assert_close_to_eager((2, 4096, 16, 32, 128, 128), 64, dtype, True, True, tolerance, seed=6)


def test_benchmark_times_the_triton_row(tmp_path):
    # benchmarks/gdn.py at its tiny shape: the triton row is timed and matches eager (under the
    # interpreter here, which tests/conftest.py turned on for this process and its children).
    out = tmp_path / "gdn.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gdn.py"
    args = ["--small", "--reps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["triton"]["median_ms"] > 0, rows["triton"]
    # Benchmark operands are float32 on CPU, bf16 on a GPU.
    tolerance = FLOAT32_REL if DEVICE == "cpu" else BF16_REL
    assert max(rows["triton"]["max_rel_deviation_from_eager_float32"].values()) < tolerance
