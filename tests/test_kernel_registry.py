"""The kernel registry: explicit requests are honoured or fail naming what is available, only
`auto` chooses, and every model instance uses the kernels it was built with."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch
from conftest import perturb_parameters, small_config

from megatron_hybrid.kernels import (
    OPS,
    REGISTRY,
    Implementation,
    KernelError,
    KernelSettings,
    add_kernel_args,
    kernels_from_settings,
    resolve_kernels,
)
from megatron_hybrid.kernels.cli import parse_kernel_requests
from megatron_hybrid.kernels.norms.eager import rms_norm
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import flags_to_settings


def registry_with(*impls: Implementation):
    registry = REGISTRY.copy()
    for impl in impls:
        registry.register(impl)
    return registry


def counting_rms_norm(calls: list):
    def impl(x, weight, eps):
        calls.append(x.shape)
        return rms_norm(x, weight, eps)

    return impl


# -- explicit requests ----------------------------------------------------------------------------


def test_every_op_has_an_eager_implementation():
    kernels = resolve_kernels({}, "eager", "cpu")
    assert set(kernels.choices) == set(OPS)
    assert all(choice.impl == "eager" for choice in kernels.choices.values())


def test_unknown_op_is_an_error_listing_the_ops():
    with pytest.raises(KernelError, match=r"unknown kernel op 'rmsnorm'; ops: rms_norm, "):
        resolve_kernels({"rmsnorm": "eager"})


def test_unknown_implementation_is_an_error_naming_the_implementations():
    with pytest.raises(KernelError) as error:
        resolve_kernels({"rms_norm": "cutlass"})
    assert "no implementation 'cutlass' for kernel op 'rms_norm'" in str(error.value)
    assert "implementations: eager, triton" in str(error.value)


@pytest.mark.parametrize(
    "backend,install", [("te", "transformer_engine"), ("apex", "apex"), ("liger", "liger-kernel")]
)
def test_unregistered_backend_is_an_error_saying_how_to_install_it(backend, install):
    with pytest.raises(KernelError, match=rf"no {backend!r} implementation") as error:
        resolve_kernels({"rms_norm": backend}, "eager", "cpu")
    message = str(error.value)
    assert install in message and "not registered" in message
    assert "implementations: eager, triton" in message


def test_unknown_mode_is_an_error():
    with pytest.raises(KernelError, match="unknown kernel mode 'fast'; valid: auto, eager"):
        resolve_kernels({}, "fast")


def test_triton_on_cpu_without_the_interpreter_explains_both_options(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelError) as error:
        resolve_kernels({"gated_rms_norm": "triton"}, "eager", "cpu")
    message = str(error.value)
    assert "TRITON_INTERPRET=1" in message and "CUDA device" in message
    assert "available for gated_rms_norm on cpu: eager" in message


def test_triton_on_cpu_after_triton_was_imported_for_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    compiled_library = types.SimpleNamespace(sum=lambda *args: None)  # not InterpretedFunction
    monkeypatch.setitem(sys.modules, "triton.language.standard", compiled_library)
    with pytest.raises(KernelError, match="triton was imported before TRITON_INTERPRET=1 was set"):
        resolve_kernels({"rms_norm": "triton"}, "eager", "cpu")


def test_implementation_for_another_device_type_is_an_error():
    registry = registry_with(
        Implementation("rms_norm", "cuda_only", counting_rms_norm([]), device_types=("cuda",))
    )
    with pytest.raises(
        KernelError,
        match="rms_norm=cuda_only cannot run here: needs a cuda "
        "device, got cpu; available for rms_norm on cpu: eager",
    ):
        resolve_kernels({"rms_norm": "cuda_only"}, "eager", "cpu", registry)


def test_too_old_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    registry = registry_with(
        Implementation(
            "rms_norm",
            "hopper",
            counting_rms_norm([]),
            device_types=("cuda",),
            min_compute_capability=(9, 0),
        )
    )
    with pytest.raises(
        KernelError,
        match=r"needs compute capability >= 9\.0, device cuda has "
        r"7\.5",
    ):
        resolve_kernels({"rms_norm": "hopper"}, "eager", "cuda", registry)


def test_implementation_that_fails_to_import_is_an_error_saying_how_to_install():
    registry = registry_with(
        Implementation(
            "rms_norm",
            "te",
            "transformer_engine_not_here.pytorch:rms_norm",
            requires=("transformer_engine_not_here",),
            install_hint="pip install transformer-engine",
        )
    )
    with pytest.raises(KernelError) as error:
        resolve_kernels({"rms_norm": "te"}, "eager", "cpu", registry)
    message = str(error.value)
    assert "rms_norm=te: cannot import transformer_engine_not_here" in message
    assert "(pip install transformer-engine)" in message
    assert "other implementations of rms_norm: eager" in message


def test_requested_implementation_is_bound_in_either_mode():
    calls = []
    registry = registry_with(Implementation("rms_norm", "spy", counting_rms_norm(calls)))
    for mode in ("eager", "auto"):
        kernels = resolve_kernels({"rms_norm": "spy"}, mode, "cpu", registry)
        assert kernels.impl("rms_norm") == "spy"
        assert "rms_norm=spy (requested)" in kernels.describe()


# -- auto -----------------------------------------------------------------------------------------


def test_auto_on_cpu_binds_eager_and_says_why(monkeypatch):
    monkeypatch.delenv("MEGATRON_HYBRID_TRITON_ON_CPU", raising=False)
    kernels = resolve_kernels({}, "auto", "cpu")
    assert all(choice.impl == "eager" for choice in kernels.choices.values())
    line = kernels.describe()
    assert line.startswith("kernels (auto on cpu): rms_norm=eager, ")
    assert "not triton for rms_norm, add_rms_norm, gated_rms_norm" in line
    assert "MEGATRON_HYBRID_TRITON_ON_CPU=1" in line


def test_auto_prefers_the_highest_priority_available_implementation():
    calls = []
    registry = registry_with(
        Implementation("rms_norm", "spy", counting_rms_norm(calls), priority=100)
    )
    assert resolve_kernels({}, "auto", "cpu", registry).impl("rms_norm") == "spy"


def test_auto_passes_over_an_implementation_that_fails_to_import():
    registry = registry_with(
        Implementation("rms_norm", "broken", "no_such_kernel_module:f", priority=100)
    )
    kernels = resolve_kernels({}, "auto", "cpu", registry)
    assert kernels.impl("rms_norm") == "eager"
    assert "not broken for rms_norm: rms_norm=broken: cannot import no_such_kernel_module" in (
        kernels.describe()
    )


def test_auto_uses_triton_on_cpu_when_asked_to(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MEGATRON_HYBRID_TRITON_ON_CPU", "1")
    reason = REGISTRY.implementations("rms_norm")["triton"].unavailable_reason(torch.device("cpu"))
    if reason is not None:  # a GPU machine: triton was imported for the GPU (tests/conftest.py)
        pytest.skip(reason)
    kernels = resolve_kernels({}, "auto", "cpu")
    assert kernels.impl("gated_rms_norm") == "triton"
    assert kernels.impl("ssd") == "triton"


# -- binding per model instance -------------------------------------------------------------------


def test_two_models_in_one_process_use_their_own_kernels():
    calls_a, calls_b = [], []
    registry = registry_with(
        Implementation("rms_norm", "spy_a", counting_rms_norm(calls_a)),
        Implementation("rms_norm", "spy_b", counting_rms_norm(calls_b)),
    )
    config = small_config("M-*")
    kernels_a = resolve_kernels({"rms_norm": "spy_a"}, "eager", "cpu", registry)
    kernels_b = resolve_kernels({"rms_norm": "spy_b"}, "eager", "cpu", registry)
    model_a = HybridModel(config, seed=1, kernels=kernels_a)
    model_b = HybridModel(config, seed=1, kernels=kernels_b)
    tokens = torch.randint(0, config.vocab_size, (2, 5))

    model_a(tokens)
    assert len(calls_a) == 4 and not calls_b  # 3 blocks' input norms + final norm
    model_b(tokens)
    assert len(calls_a) == 4 and len(calls_b) == 4
    assert model_a.decoder.final_norm.kernels is kernels_a
    assert model_b.decoder.layers["1"].channel_norm.kernels is kernels_b


def test_model_without_kernels_is_eager_everywhere():
    model = HybridModel(small_config("[M-]E"))
    assert all(choice.impl == "eager" for choice in model.kernels.choices.values())


# Logits and gradients of the Triton model against eager, per device. Both compute in float32 and
# differ only in summation order, a few float32 ulp (1.2e-7) per op. Under the CPU interpreter
# (numpy float32) measured: logits within 1.7e-7 (|logits| <= 0.5), every gradient within
# 1.2e-8 (|grad| <= 2.5e-2, errors <= 1% of rtol 1e-4 + atol 1e-6): the CPU bounds leave 6-8x.
# The CUDA bounds are the earlier, looser ones, not re-measured with these shapes.
MODEL_TOLERANCE = {
    "cpu": dict(logits=dict(rtol=1e-5, atol=1e-6), grads=dict(rtol=1e-5, atol=1e-7)),
    "cuda": dict(logits=dict(rtol=1e-5, atol=1e-5), grads=dict(rtol=1e-4, atol=1e-6)),
}


@pytest.mark.slow  # ~20 s on 2 CPU cores: the interpreter runs the conv1d and SSD kernels
def test_model_with_triton_kernels_matches_eager_logits_and_gradients():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = small_config("[M-][*E]M-", ffn_hidden_size=24, moe_ffn_hidden_size=16)
    triton_ops = [
        op for op, impls in ((op, REGISTRY.implementations(op)) for op in OPS) if "triton" in impls
    ]
    kernels = resolve_kernels({op: "triton" for op in triton_ops}, "eager", device)
    # Off the initial weights (norm weights and D all one there), the same for both models.
    eager = perturb_parameters(HybridModel(config, seed=5), seed=1).to(device)
    fast = perturb_parameters(HybridModel(config, seed=5, kernels=kernels), seed=1).to(device)
    # Two whole SSD chunks and a partial one: states carried between chunks and a ragged end.
    seq = 2 * config.mamba_chunk_size + 3
    tokens = torch.randint(
        0,
        config.vocab_size,
        (2, seq),
        device=device,
        generator=torch.Generator(device).manual_seed(0),
    )
    expected = eager(tokens)
    expected.square().mean().backward()
    logits = fast(tokens)
    logits.square().mean().backward()
    tolerance = MODEL_TOLERANCE[device]
    torch.testing.assert_close(logits, expected, **tolerance["logits"])
    for (name, p_eager), p_fast in zip(eager.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_eager.grad, **tolerance["grads"], msg=name)


# -- command line ---------------------------------------------------------------------------------


def parse(argv: list[str]) -> KernelSettings:
    parser = argparse.ArgumentParser()
    add_kernel_args(parser)
    return flags_to_settings(KernelSettings, parser.parse_args(argv))


def test_kernel_flags_default_to_auto_which_is_eager_on_cpu():
    """Without --kernels a run gets the fastest kernels its device supports (Triton on CUDA:
    what the benchmarks measure, so the training script runs at their speed); on CPU that is
    still the eager reference for every op, no Triton interpreter unless asked for."""
    args = parse([])
    assert args.kernels == "auto" and args.kernel == []
    bound = kernels_from_settings(args, "cpu")
    assert {choice.impl for choice in bound.choices.values()} == {"eager"}


def test_kernel_flag_is_repeatable():
    assert parse_kernel_requests(["rms_norm=eager", "activation.swiglu = eager"]) == {
        "rms_norm": "eager",
        "activation.swiglu": "eager",
    }
    kernels = kernels_from_settings(
        parse(["--kernels", "auto", "--kernel", "rms_norm=eager"]), "cpu"
    )
    assert kernels.mode == "auto" and kernels.choices["rms_norm"].how == "requested"


@pytest.mark.parametrize("item", ["rms_norm", "rms_norm=", "=triton", "a=b=c"])
def test_malformed_kernel_flag_is_an_error(item):
    with pytest.raises(KernelError, match="expected OP=IMPL"):
        parse_kernel_requests([item])


def test_one_op_requested_twice_differently_is_an_error():
    with pytest.raises(KernelError, match="requested as both 'eager' and 'triton'"):
        parse_kernel_requests(["rms_norm=eager", "rms_norm=triton"])


def test_kernels_flag_rejects_unknown_modes(capsys):
    with pytest.raises(SystemExit):
        parse(["--kernels", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "capability, triton, tilelang, refused",
    [
        ((9, 0), "3.6.0", False, True),  # what an H100 with torch 2.11's Triton has
        ((9, 0), "3.7.1", False, False),
        ((9, 0), "3.6.0", True, False),
        ((8, 0), "3.6.0", False, False),  # A100: fla's kernels are right there
        ((9, 0), "3.3.1", False, False),
    ],
)
def test_fla_is_not_bound_where_it_computes_wrong_gradients(capability, triton, tilelang, refused):
    from megatron_hybrid.kernels.registry import fla_hopper_triton_problem

    problem = fla_hopper_triton_problem(capability, triton, tilelang)
    assert (problem is not None) == refused
    if refused:
        assert "Triton >= 3.7.1" in problem and triton in problem
