"""The `gated_delta_rule` op: the eager chunked kernel against the token-by-token recurrence in
float64 (tests/gdn_reference.py), its registry entries, and (marked gpu) fla's kernel against
the eager one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gdn_reference import gated_delta_recurrence, inputs, relative_error

from megatron_hybrid.kernels.gated_delta_rule.eager import chunk_gated_delta_rule
from megatron_hybrid.kernels.registry import REGISTRY, KernelError, resolve_kernels

# Chunked and sequential evaluation compute the same float64 sums in another association (and
# the chunked one through a triangular solve), so they agree to float64 rounding of O(1) values.
FLOAT64 = dict(rtol=1e-10, atol=1e-10)
# float32 against float64: relative error (max |error| / max |reference|) at most 1e-5, the
# bound the layer is held to; float32 rounding of these O(1) sums is ~1e-7 per operation.
FLOAT32_REL = 1e-5


@pytest.mark.parametrize(
    "seqlen, chunk_size",
    [(16, 4), (13, 4), (1, 4), (5, 8), (37, 16), (64, 64), (70, 64)],
    ids=lambda x: str(x),
)
def test_chunked_equals_the_recurrence_in_float64(seqlen, chunk_size):
    q, k, v, g, beta = inputs(2, seqlen, 2, 4, 6, 5)
    o, final = chunk_gated_delta_rule(
        q, k, v, g, beta, output_final_state=True, chunk_size=chunk_size
    )
    o_ref, final_ref = gated_delta_recurrence(q, k, v, g, beta, 6**-0.5)
    torch.testing.assert_close(o, o_ref, **FLOAT64)
    torch.testing.assert_close(final, final_ref, **FLOAT64)


def test_initial_state_continues_the_sequence():
    # Generation's contract: running a sequence in two pieces, the second from the first's final
    # state, gives the outputs and final state of one run over the whole.
    q, k, v, g, beta = inputs(2, 23, 1, 3, 4, 6, seed=1)
    whole, whole_final = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    cut = 9
    head = [t[:, :cut] for t in (q, k, v, g, beta)]
    tail = [t[:, cut:] for t in (q, k, v, g, beta)]
    first, state = chunk_gated_delta_rule(*head, output_final_state=True, chunk_size=4)
    second, final = chunk_gated_delta_rule(
        *tail, initial_state=state, output_final_state=True, chunk_size=4
    )
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, **FLOAT64)
    torch.testing.assert_close(final, whole_final, **FLOAT64)


def test_initial_state_matches_the_recurrence():
    q, k, v, g, beta = inputs(1, 11, 2, 2, 3, 4, seed=2)
    state = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    o, final = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=0.7, initial_state=state, output_final_state=True, chunk_size=4
    )
    o_ref, final_ref = gated_delta_recurrence(q, k, v, g, beta, 0.7, state)
    torch.testing.assert_close(o, o_ref, **FLOAT64)
    torch.testing.assert_close(final, final_ref, **FLOAT64)


def test_strong_decay_stays_finite_and_exact():
    # Log decays of -60 make e^{-G} overflow float32 (and e^{+60 * chunk} float64): the chunked
    # form must only ever exponentiate G or differences G_t - G_s with s <= t.
    q, k, v, g, beta = inputs(1, 40, 1, 2, 4, 4, seed=3, strong_decay=True)
    assert (g == -60.0).sum() > 5
    o_ref, _ = gated_delta_recurrence(q, k, v, g, beta, 0.5)
    for dtype in (torch.float64, torch.float32):
        o, _ = chunk_gated_delta_rule(
            *(t.to(dtype) for t in (q, k, v, g, beta)), scale=0.5, chunk_size=16
        )
        assert torch.isfinite(o).all()
        assert relative_error(o, o_ref) < (1e-10 if dtype == torch.float64 else FLOAT32_REL)


def test_float32_keeps_recent_decays_when_the_chunks_decay_is_large():
    # Megatron's initial decay rates: g = -A * softplus(a + 1), A in [1, 16], so a chunk of 64
    # sums to G of about -1000. A decay between nearby steps taken as the difference G_t - G_s
    # of two such sums carries float32 errors of 1e-4; summed over the segment it stays exact.
    gen = torch.Generator().manual_seed(10)
    q, k, v, _, beta = inputs(1, 100, 1, 2, 8, 8, seed=10)
    A = torch.empty(2, dtype=torch.float64).uniform_(1.0, 16.0, generator=gen)
    g = -A * torch.nn.functional.softplus(0.3 * torch.randn(1, 100, 2, generator=gen) + 1.0)
    operands = (q, k, v, g.double(), beta)
    ref = [t.clone().requires_grad_() for t in operands]
    o_ref, _ = gated_delta_recurrence(*ref, 8**-0.5)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    grads_ref = torch.autograd.grad((o_ref * do).sum(), ref)
    ours = [t.float().requires_grad_() for t in operands]
    o, _ = chunk_gated_delta_rule(*ours)
    grads = torch.autograd.grad((o * do.float()).sum(), ours)
    assert relative_error(o, o_ref) < FLOAT32_REL
    for name, got, want in zip("q k v g beta".split(), grads, grads_ref, strict=True):
        assert relative_error(got, want) < FLOAT32_REL, name


@pytest.mark.parametrize("seqlen", [24, 21])
def test_float32_forward_and_gradients_are_within_1e5_of_the_float64_recurrence(seqlen):
    operands = inputs(2, seqlen, 2, 4, 8, 8, seed=4)
    state = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    names = ("q", "k", "v", "g", "beta", "initial_state")
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(2, seqlen, 4, 8, dtype=torch.float64, generator=gen)
    dstate = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=gen)

    ref = [t.clone().requires_grad_() for t in (*operands, state)]
    o_ref, final_ref = gated_delta_recurrence(*ref[:5], 8**-0.5, ref[5])
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (final_ref * dstate).sum(), ref)

    ours = [t.float().requires_grad_() for t in (*operands, state)]
    o, final = chunk_gated_delta_rule(
        *ours[:5], initial_state=ours[5], output_final_state=True, chunk_size=8
    )
    grads = torch.autograd.grad((o * do.float()).sum() + (final * dstate.float()).sum(), ours)
    assert o.dtype == torch.float32
    assert relative_error(o, o_ref) < FLOAT32_REL
    assert relative_error(final, final_ref) < FLOAT32_REL
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        assert relative_error(got, want) < FLOAT32_REL, name


def test_half_precision_inputs_compute_in_float32_and_return_their_dtype():
    q, k, v, g, beta = inputs(1, 10, 1, 1, 4, 4, seed=8)
    o, final = chunk_gated_delta_rule(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), g.float(), beta.bfloat16(),
        output_final_state=True, chunk_size=4,
    )  # fmt: skip
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=torch.zeros(2, 5, 2, 5)), r"k has shape \(2, 5, 2, 5\), expected q.s shape"),
        (dict(v=torch.zeros(2, 5, 3, 4)), r"value_heads \(3, .*must be a multiple of key_heads"),
        (dict(g=torch.zeros(2, 5, 2)), r"g has shape \(2, 5, 2\), expected \(batch, seqlen"),
        (dict(initial_state=torch.zeros(2, 4, 4, 3)), r"initial_state has shape \(2, 4, 4, 3\)"),
        (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
    ],
)
def test_wrong_arguments_are_named(change, message):
    q, k, v, g, beta = inputs(2, 5, 2, 4, 3, 4)
    args = {**dict(q=q, k=k, v=v, g=g, beta=beta), **change}
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**args)


# -- the registry ---------------------------------------------------------------------------


def test_the_op_has_an_eager_and_an_fla_implementation():
    assert set(REGISTRY.implementations("gated_delta_rule")) >= {"eager", "fla"}


def test_auto_on_cpu_binds_eager_and_says_fla_needs_cuda():
    kernels = resolve_kernels({}, "auto", "cpu")
    assert kernels.impl("gated_delta_rule") == "eager"
    assert "not fla for gated_delta_rule: needs a cuda device" in kernels.describe()


def test_requesting_fla_on_cpu_is_an_error_naming_the_alternatives():
    with pytest.raises(KernelError, match=r"gated_delta_rule=fla cannot run here: needs a cuda"):
        resolve_kernels({"gated_delta_rule": "fla"}, "eager", "cpu")


def test_fla_that_does_not_import_is_an_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # as if fla-core were not installed
    monkeypatch.setitem(sys.modules, "fla.ops", None)
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", None)
    with pytest.raises(KernelError, match="pip install fla-core"):
        REGISTRY.implementations("gated_delta_rule")["fla"].load()


# -- the benchmark ---------------------------------------------------------------------------


def test_benchmark_runs_every_implementation_at_a_tiny_shape(tmp_path):
    out = tmp_path / "gdn.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gdn.py"
    args = ["--small", "--reps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows.keys() == set(REGISTRY.implementations("gated_delta_rule"))
    assert rows["eager"]["median_ms"] > 0 and rows["eager"]["fwd_median_ms"] > 0
    if not torch.cuda.is_available():
        assert "needs a cuda device" in rows["fla"]["skipped"]
    assert "eager" in proc.stdout and "fla" in proc.stdout


# -- fla on a GPU ---------------------------------------------------------------------------


def _on_gpu(dtype, *tensors):
    return [t.to("cuda", dtype).requires_grad_() for t in tensors]


def skip_where_fla_cannot_run() -> None:
    """Skip without fla, and where the registry refuses it (e.g. Hopper with a Triton that
    makes fla's gradients wrong, which fla itself then refuses to compute)."""
    pytest.importorskip("fla.ops.gated_delta_rule")
    refused = REGISTRY.implementations("gated_delta_rule")["fla"].unavailable_reason(
        torch.device("cuda")
    )
    if refused is not None:
        pytest.skip(f"fla is refused here: {refused}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [256, 300])
def test_fla_matches_eager_forward_and_gradients_on_gpu(dtype, seqlen):
    skip_where_fla_cannot_run()
    fla_rule = REGISTRY.implementations("gated_delta_rule")["fla"].load()
    operands = inputs(2, seqlen, 4, 8, 64, 64, seed=9)
    state = torch.randn(
        2, 8, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    do = torch.randn(2, seqlen, 8, 64, generator=torch.Generator().manual_seed(2)).cuda()
    results = []
    for rule, cast in ((fla_rule, dtype), (chunk_gated_delta_rule, torch.float32)):
        leaves = _on_gpu(cast, *operands)
        leaves[3] = leaves[3].detach().float().requires_grad_()  # g stays float32, as the layer's
        s0 = state.to("cuda", torch.float32).requires_grad_()
        o, final = rule(*leaves, initial_state=s0, output_final_state=True)
        loss = (o.float() * do).sum() + final.float().pow(2).sum()
        results.append([o, final, *torch.autograd.grad(loss, [*leaves, s0])])
    # fla computes in float32 from bf16 or float32 operands. bf16 operands carry 2^-8 relative
    # rounding, which sums of a 64-position chunk turn into up to ~1e-2 of the output's range;
    # float32 operands go through Triton dots in TF32 (2^-11 per product): a few 1e-4.
    tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3
    names = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state")
    for name, got, want in zip(names, *results, strict=True):
        assert relative_error(got.float(), want.double()) < tolerance, name


@pytest.mark.gpu
def test_auto_binds_fla_on_gpu_when_it_is_installed_and_usable():
    pytest.importorskip("fla.ops.gated_delta_rule")
    # Where fla is known to compute wrong gradients (Hopper with some Triton releases), auto
    # binds our triton implementation instead.
    problem = REGISTRY.implementations("gated_delta_rule")["fla"].unavailable_reason(
        torch.device("cuda")
    )
    expected = "fla" if problem is None else "triton"
    assert resolve_kernels({}, "auto", "cuda").impl("gated_delta_rule") == expected


@pytest.mark.gpu
def test_a_model_on_fla_matches_the_model_on_eager_on_gpu():
    skip_where_fla_cannot_run()
    from conftest import perturb_parameters, small_config

    from megatron_hybrid.model import HybridModel

    config = small_config("[G-]MG", linear_key_head_dim=16, linear_value_head_dim=16)
    tokens = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for impl in ("fla", "eager"):
        kernels = resolve_kernels({"gated_delta_rule": impl}, "eager", "cuda")
        model = perturb_parameters(HybridModel(config, seed=3, kernels=kernels)).cuda()
        logits = model(tokens)
        logits.float().pow(2).mean().backward()
        results.append([logits, *(p.grad for p in model.parameters())])
    # float32 throughout; fla's Triton dots round to TF32 (2^-11), eager's matmuls do not.
    for got, want in zip(*results, strict=True):
        assert relative_error(got, want.double()) < 5e-3
