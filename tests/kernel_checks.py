"""Checks of a Triton kernel against its eager reference, shared by the test_triton_* files.

The reference is the eager op run in float32 on the same input values (bfloat16 inputs
upcast), its outputs and gradients rounded to the kernel's dtypes: the kernels promise float32
math rounded once. (The eager op run in bfloat16 also rounds intermediate gradients, e.g. the
two terms of add_rms_norm's input gradient, so it is itself ~1 bf16 ulp of the largest term
off; output gradients are bfloat16-representable so both sides see the same values.)

Tolerances:
- float32: the sums run in another order; each of the <= 64 accumulated terms adds at most
  ~1 ulp (1.2e-7) of relative error, so 1e-5 relative/absolute holds with margin.
- bfloat16: the two results are float32 values a few float32 ulp apart, rounded to 8
  significant bits. On GPU both round to nearest (<= 1 bf16 ulp apart when a rounding boundary
  falls between them); the CPU interpreter truncates float32 -> bfloat16 instead, adding up to
  1 ulp. 2 ulp = 2^-6 relative: rtol 1.6e-2 (torch's default for bfloat16).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

import megatron_hybrid.kernels as kernels_package
from megatron_hybrid.kernels.registry import REGISTRY

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}


def require_triton_kernels() -> None:
    """Skip the calling test module where Triton kernels cannot run here: triton is not
    installed, or DEVICE cannot run it (on CPU: without the interpreter, which tests/conftest.py
    turns on).

    With triton installed, a kernel module (kernels/<op>/triton*.py) that fails to import fails the
    calling module, naming the broken one: as a skip it would silently hide every Triton test."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip(
            "the Triton kernels need the triton package (pip install triton); the eager "
            "path is tested elsewhere",
            allow_module_level=True,
        )
    reason = REGISTRY.implementations("rms_norm")["triton"].unavailable_reason(torch.device(DEVICE))
    if reason is not None:
        pytest.skip(f"Triton kernels cannot run here: {reason}", allow_module_level=True)
    broken = triton_kernel_import_errors()
    if broken:
        pytest.fail(
            "triton is installed but Triton kernel modules fail to import:\n"
            + "\n".join(f"  {name}: {error}" for name, error in broken.items()),
            pytrace=False,
        )


def triton_kernel_modules() -> dict[str, Path]:
    """{module name: file} of every Triton kernel module: kernels/<op>/triton*.py."""
    root = Path(kernels_package.__file__).parent
    modules = {
        f"{kernels_package.__name__}.{path.parent.name}.{path.stem}": path
        for path in sorted(root.glob("*/triton*.py"))
    }
    # An empty glob (the layout changed under it) would check nothing and pass.
    assert modules, f"no Triton kernel modules found under {root}/<op>/triton*.py"
    return modules


def triton_kernel_import_errors() -> dict[str, str]:
    """ "module (file)" -> its import error, for every Triton kernel module that fails to
    import."""
    broken = {}
    for name, path in triton_kernel_modules().items():
        try:
            importlib.import_module(name)
        except Exception as error:  # an ImportError, or the module raising as it loads
            broken[f"{name} ({path})"] = f"{type(error).__name__}: {error}"
    return broken


def round_to_bfloat16(t: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 as a Triton kernel's cast rounds on DEVICE: to nearest even on GPU;
    toward zero (the low 16 bits dropped) under the CPU interpreter (triton 3.9)."""
    if DEVICE == "cuda":
        return t.to(torch.bfloat16)
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(device=device, dtype=dtype)


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


def outputs_and_grads(fn, inputs: list[torch.Tensor], *args, seed=100):
    """fn(*inputs, *args), and the gradients of every input under random output gradients
    (bfloat16-representable, so every dtype sees the same values)."""
    inputs = [leaf(t) for t in inputs]
    outputs = fn(*inputs, *args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum(
        (out.float() * randn(*out.shape, seed=seed + i, dtype=torch.bfloat16).float()).sum()
        for i, out in enumerate(outputs)
    )
    return outputs, torch.autograd.grad(loss, inputs)


def assert_matches(fn_triton, fn_eager, inputs, *args, dtype, tolerance=TOLERANCE):
    """fn_triton's outputs and input gradients equal fn_eager's in float32 on the same values,
    rounded to fn_triton's dtypes (which are fn_eager's dtypes on the original inputs)."""
    out_t, grads_t = outputs_and_grads(fn_triton, inputs, *args)
    out_r, grads_r = outputs_and_grads(fn_eager, [t.float() for t in inputs], *args)
    out_native = fn_eager(*inputs, *args)
    out_native = out_native if isinstance(out_native, tuple) else (out_native,)
    for t, r, native in zip(out_t, out_r, out_native, strict=True):
        assert t.dtype == native.dtype and t.shape == native.shape
        torch.testing.assert_close(
            t, r.to(t.dtype), **tolerance[dtype], msg=lambda m: f"output: {m}"
        )
    for i, (t, r) in enumerate(zip(grads_t, grads_r, strict=True)):
        assert t.dtype == inputs[i].dtype and t.shape == inputs[i].shape
        torch.testing.assert_close(
            t, r.to(t.dtype), **tolerance[dtype], msg=lambda m, i=i: f"gradient of input {i}: {m}"
        )
