"""The kernel registry: ops, their named implementations, and per-model binding.

An *op* is one piece of math with a fixed calling convention (`rms_norm(x, weight, eps)`); the
mathematical variant is part of its name (`gated_rms_norm` is not `rms_norm`,
`activation.swiglu` is not `activation.squared_relu`). An *implementation* computes that op
under hardware requirements (device type, minimum compute capability, modules that must import).
`eager` (plain PyTorch, the reference) exists for every op and runs everywhere.

`resolve_kernels(requests, mode, device)` binds one implementation per op into a `BoundKernels`,
which a model receives at construction and hands to its layers; nothing is bound in module
globals, so two models in one process may use different kernels.

- an explicit request (`--kernel rms_norm=triton`) is honoured or is an error naming the reason
  and the implementations that are available;
- mode `eager` binds eager for every op not requested;
- mode `auto` binds, per op, the preferred implementation whose requirements hold, and
  `BoundKernels.describe()` says what it chose and what it passed over.

Triton on CPU: Triton kernels run on CPU tensors only under its interpreter
(`TRITON_INTERPRET=1`, set before triton is imported), which is slow and meant for tests. An
explicit request for a Triton implementation on CPU is honoured under the interpreter; `auto`
on CPU binds eager unless `MEGATRON_HYBRID_TRITON_ON_CPU=1` is also set.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

TRITON_INTERPRET_ENV = "TRITON_INTERPRET"
AUTO_TRITON_ON_CPU_ENV = "MEGATRON_HYBRID_TRITON_ON_CPU"
MODES = ("auto", "eager")

# op -> its calling convention. The eager implementation of each is the reference.
OPS: dict[str, str] = {
    "rms_norm": "rms_norm(x, weight, eps) -> y",
    "add_rms_norm": "add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), "
    "x + residual)",
    "gated_rms_norm": "gated_rms_norm(x, gate, weight, group_size, eps) -> "
    "rms_norm(x * silu(gate)) per group",
    "activation.squared_relu": "squared_relu(h) -> relu(h)^2",
    "activation.swiglu": "swiglu(h) -> silu(h[..., :F]) * h[..., F:]",
    "causal_conv1d": "causal_conv1d(x_BLC, weight, bias, activation) -> y_BLC",
    "ssd": "ssd(x, dt, A, B, C, chunk_size, D=, dt_bias=, dt_softplus=, dt_limit=, "
    "initial_states=, return_final_states=) -> y (, final_states)",
    "causal_conv1d_step": "causal_conv1d_step(x_BC, state_BCW, weight, bias, activation) -> y_BC; "
    "the window of previous inputs `state` advanced in place (decoding)",
    "ssd_step": "ssd_step(state, x, dt, A, B, C, D=, dt_bias=, dt_softplus=, dt_limit=) -> y; "
    "the SSM state advanced by one token in place (decoding)",
    "gated_delta_rule": "gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, "
    "output_final_state=False) -> (o, final_state): S_t = exp(g_t) (I - beta_t k_t k_t^T) "
    "S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t",
    "moe.experts": "experts(x_sorted_TH, tokens_per_expert_E, fc1_EFH, fc2_EHF, activation) -> "
    "y_sorted_TH: each expert's fc2(act(fc1 x)) on its rows of the expert-sorted tokens",
    "mlp": "mlp(x, linear_fc1, linear_fc2, act) -> linear_fc2(act(linear_fc1(x)))",
    "rotary": "rotary(x, cos, sin) -> x * cos + cat(-x2, x1) * sin (rotate-half RoPE)",
    "sparse_attention": "sparse_attention(q, k, v, topk_indices, scale) -> softmax attention of "
    "each query over the keys its top-k list selects (-1: none)",
    "linear_cross_entropy": "linear_cross_entropy(hidden, weight, labels, ignore_index=-100) -> "
    "float32 mean cross-entropy of hidden @ weight^T over tokens not ignored",
}


# Transforms: implementations that rewrite a model's modules once, in the parallelize step
# (megatron_hybrid/parallel/parallelize.py), instead of being called by the layers. They state
# their requirements as the ops' implementations do and are bound with `bind_transform`.
TRANSFORMS: dict[str, str] = {
    "float8_training": "float8_training(module, fp8_format, fp8_recipe, module_filter) -> "
    "names of the nn.Linear swapped for ones whose GEMMs run in FP8 (weights stay high "
    "precision)",
}


class KernelError(ValueError):
    """A kernel request that cannot be honoured: unknown op or implementation, missing hardware,
    or an implementation whose modules do not import."""


@dataclass(frozen=True)
class Implementation:
    """One way to compute one op.

    `target` is "module:attribute", imported only when the implementation is bound, so an
    implementation whose package is missing costs nothing until it is asked for (or, for
    implementations registered at run time, the function itself).
    """

    op: str
    name: str
    target: str | Callable
    device_types: tuple[str, ...] = ("cpu", "cuda")
    min_compute_capability: tuple[int, int] | None = None  # CUDA only
    requires: tuple[str, ...] = ()  # modules that must import
    install_hint: str = ""  # how to get `requires`, quoted in errors
    cpu_needs_triton_interpreter: bool = False
    priority: int = 0  # auto prefers the highest available
    # A known-bad environment (a library version that computes wrong results on some GPU):
    # returns why, or None.
    environment_problem: Callable[[torch.device], str | None] | None = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this implementation cannot run on `device` (hardware and environment only; the
        import is checked by `load`), or None when it can."""
        if device.type == "cpu" and self.cpu_needs_triton_interpreter:
            return _triton_interpreter_problem()
        if device.type not in self.device_types:
            return f"needs a {' or '.join(self.device_types)} device, got {device.type}"
        if device.type == "cuda" and self.min_compute_capability is not None:
            capability = torch.cuda.get_device_capability(device)
            if capability < self.min_compute_capability:
                need = ".".join(map(str, self.min_compute_capability))
                return f"needs compute capability >= {need}, device {device} has " + ".".join(
                    map(str, capability)
                )
        if self.environment_problem is not None:
            return self.environment_problem(device)
        return None

    def load(self) -> Callable:
        """Import the required modules and the target; raise KernelError saying what failed
        and how to install it."""
        module_name, attribute = (None, None) if callable(self.target) else self.target.split(":")
        modules = {}
        for name in (*self.requires, *([module_name] if module_name else [])):
            try:
                modules[name] = importlib.import_module(name)
            except Exception as error:  # an ImportError, or a kernel module failing as it loads
                hint = f" ({self.install_hint})" if self.install_hint else ""
                raise KernelError(
                    f"{self.op}={self.name}: cannot import {name}: {error}{hint}"
                ) from error
        return self.target if module_name is None else getattr(modules[module_name], attribute)


def _triton_interpreter_problem() -> str | None:
    """Why Triton kernels cannot run on CPU tensors in this process, or None."""
    if os.environ.get(TRITON_INTERPRET_ENV) != "1":
        return (
            f"Triton runs on CPU only under its interpreter: set {TRITON_INTERPRET_ENV}=1 "
            "before starting (slow, meant for tests), or run on a CUDA device"
        )
    # triton.jit picks interpreter or compiler as each function is decorated, triton's own
    # library (tl.sum, tl.sigmoid) included as triton is imported.
    standard = sys.modules.get("triton.language.standard")
    if standard is not None and type(standard.sum).__name__ != "InterpretedFunction":
        return (
            f"triton was imported before {TRITON_INTERPRET_ENV}=1 was set, so its library is "
            f"compiled for a GPU: set {TRITON_INTERPRET_ENV}=1 in the environment before Python "
            "starts (tests: tests/conftest.py does)"
        )
    return None


class KernelRegistry:
    """op -> {implementation name -> Implementation}. `REGISTRY` holds the built-in ones; a test
    may `copy()` it and register more without touching the shared one."""

    def __init__(self, ops: Mapping[str, str]):
        self.ops = dict(ops)
        self._impls: dict[str, dict[str, Implementation]] = {op: {} for op in self.ops}

    def register(self, impl: Implementation) -> None:
        assert impl.op in self.ops, f"register an op in OPS first: {impl.op!r}"
        assert impl.name not in self._impls[impl.op], f"{impl.op}={impl.name} registered twice"
        self._impls[impl.op][impl.name] = impl

    def implementations(self, op: str) -> dict[str, Implementation]:
        if op not in self.ops:
            raise KernelError(f"unknown kernel op {op!r}; ops: {', '.join(self.ops)}")
        return dict(self._impls[op])

    def copy(self) -> KernelRegistry:
        other = KernelRegistry(self.ops)
        for op, impls in self._impls.items():
            other._impls[op] = dict(impls)
        return other


@dataclass(frozen=True)
class KernelChoice:
    """What one op was bound to, and why."""

    op: str
    impl: str
    how: str  # "requested", "eager mode", or "auto"
    passed_over: tuple[tuple[str, str], ...] = ()  # auto: (impl, reason) preferred but skipped
    options: tuple[tuple[str, object], ...] = ()  # keyword arguments bound into the impl


class BoundKernels:
    """One callable per op, bound for one model. `kernels.rms_norm(...)`,
    `kernels["activation.swiglu"](...)`, `kernels.activation("swiglu")(...)`."""

    def __init__(
        self,
        functions: Mapping[str, Callable],
        choices: Mapping[str, KernelChoice],
        mode: str,
        device: torch.device,
    ):
        self._functions = dict(functions)
        self.choices = dict(choices)
        self.mode = mode
        self.device = device

    def __getitem__(self, op: str) -> Callable:
        try:
            return self._functions[op]
        except KeyError:
            raise KernelError(
                f"unknown kernel op {op!r}; ops: {', '.join(self._functions)}"
            ) from None

    def __getattr__(self, name: str) -> Callable:
        functions = self.__dict__.get("_functions")
        if functions is None or name not in functions:
            raise AttributeError(name)
        return functions[name]

    def activation(self, variant: str) -> Callable:
        """The MLP activation `variant` ("squared_relu", "swiglu")."""
        variants = [op.split(".", 1)[1] for op in self._functions if op.startswith("activation.")]
        if variant not in variants:
            raise KernelError(f"unknown activation {variant!r}; valid: {', '.join(variants)}")
        return self._functions[f"activation.{variant}"]

    def impl(self, op: str) -> str:
        """The implementation name bound to `op`."""
        return self.choices[op].impl

    def describe(self) -> str:
        """One start-up line: what every op resolved to, and for auto what it passed over and
        why (ops passed over for the same reason are named together)."""
        parts, skipped = [], {}
        for op, choice in self.choices.items():
            options = ", ".join(f"{key}={value}" for key, value in choice.options)
            parts.append(
                f"{op}={choice.impl}"
                + (f"({options})" if options else "")
                + (" (requested)" if choice.how == "requested" else "")
            )
            for impl, reason in choice.passed_over:
                skipped.setdefault((impl, reason), []).append(op)
        line = f"kernels ({self.mode} on {self.device.type}): " + ", ".join(parts)
        for (impl, reason), ops in skipped.items():
            line += f"; not {impl} for {', '.join(ops)}: {reason}"
        return line

    def __repr__(self) -> str:
        return f"BoundKernels({self.describe()})"


def _preference(impls: Mapping[str, Implementation]) -> list[Implementation]:
    return sorted(impls.values(), key=lambda impl: -impl.priority)


def _available_names(registry: KernelRegistry, op: str, device: torch.device) -> list[str]:
    return [
        name
        for name, impl in registry.implementations(op).items()
        if impl.unavailable_reason(device) is None
    ]


def resolve_kernels(
    requests: Mapping[str, str] | None = None,
    mode: str = "eager",
    device: torch.device | str = "cpu",
    registry: KernelRegistry | None = None,
    options: Mapping[str, Mapping[str, object]] | None = None,
) -> BoundKernels:
    """Bind one implementation per op for a model that will run on `device`.

    Args:
        requests: op -> implementation name, honoured or an error.
        mode: "eager" (eager for every op not requested) or "auto" (the preferred available
            implementation per op; on CPU eager unless MEGATRON_HYBRID_TRITON_ON_CPU=1).
        device: where the model runs.
        registry: where implementations are looked up (default: the built-in REGISTRY).
        options: "op=impl" -> keyword arguments bound into that implementation when it is the
            one bound (`{"mlp=tiled": {"shards": 8}}`); ignored for implementations not bound.

    Raises:
        KernelError: an unknown mode, op or implementation, or a requested implementation that
            cannot run on `device` or fails to import; the message names what is available.
    """
    registry = REGISTRY if registry is None else registry
    requests = dict(requests or {})
    device = torch.device(device)
    if mode not in MODES:
        raise KernelError(f"unknown kernel mode {mode!r}; valid: {', '.join(MODES)}")
    for op in requests:
        registry.implementations(op)  # raises for an unknown op

    functions, choices = {}, {}
    for op in registry.ops:
        impls = registry.implementations(op)
        if op in requests:
            functions[op] = _load_requested(registry, op, requests[op], device)
            choices[op] = KernelChoice(op, requests[op], "requested")
        elif mode == "eager":
            functions[op] = impls["eager"].load()
            choices[op] = KernelChoice(op, "eager", "eager mode")
        else:
            functions[op], choices[op] = _auto(op, impls, device)
        kwargs = dict((options or {}).get(f"{op}={choices[op].impl}", {}))
        if kwargs:
            functions[op] = functools.partial(functions[op], **kwargs)
            choices[op] = replace(choices[op], options=tuple(kwargs.items()))
    return BoundKernels(functions, choices, mode, device)


# Backends the design names that are not registered: their torch parts cannot be built or
# installed on the machines this project is tested on, so no implementation of theirs is
# registered until one can be tested. A request for one says so and how to install it.
UNREGISTERED_BACKENDS = {
    "te": "transformer-engine: its PyTorch extension is built from source against your CUDA and "
    "torch (pip install --no-build-isolation 'transformer_engine[pytorch]')",
    "apex": "NVIDIA apex: not on PyPI, built from its source repository with its CUDA "
    "extensions (--cpp_ext --cuda_ext)",
    "liger": "Liger kernels (pip install liger-kernel)",
}


def bind_transform(
    transform: str, name: str, device: torch.device | str, registry: KernelRegistry | None = None
) -> Callable:
    """The implementation `name` of `transform` (TRANSFORMS) for a model on `device`.

    Raises:
        KernelError: unknown transform or implementation, a device it cannot run on, or a
            package that does not import; the message says why and what is available.
    """
    registry = TRANSFORM_REGISTRY if registry is None else registry
    return _load_requested(registry, transform, name, torch.device(device))


def _load_requested(registry: KernelRegistry, op: str, name: str, device: torch.device) -> Callable:
    impls = registry.implementations(op)
    if name not in impls:
        available = (
            f"implementations: {', '.join(impls)} (available on {device.type}: "
            f"{', '.join(_available_names(registry, op, device))})"
        )
        if name in UNREGISTERED_BACKENDS:
            raise KernelError(
                f"kernel op {op!r} has no {name!r} implementation: the {name} backend "
                f"({UNREGISTERED_BACKENDS[name]}) is not registered in this version of "
                f"megatron-hybrid, installed or not, because it could not be tested here; "
                f"{available}"
            )
        raise KernelError(f"no implementation {name!r} for kernel op {op!r}; {available}")
    reason = impls[name].unavailable_reason(device)
    if reason is not None:
        raise KernelError(
            f"{op}={name} cannot run here: {reason}; available for {op} on {device.type}: "
            f"{', '.join(_available_names(registry, op, device)) or 'none'}"
        )
    try:
        return impls[name].load()
    except KernelError as error:
        others = [n for n in _available_names(registry, op, device) if n != name]
        raise KernelError(
            f"{error}; other implementations of {op}: {', '.join(others) or 'none'}"
        ) from error


def _auto(
    op: str, impls: Mapping[str, Implementation], device: torch.device
) -> tuple[Callable, KernelChoice]:
    passed_over = []
    for impl in _preference(impls):
        if (
            device.type == "cpu"
            and impl.cpu_needs_triton_interpreter
            and os.environ.get(AUTO_TRITON_ON_CPU_ENV) != "1"
        ):
            reason = (
                f"auto runs Triton on CPU only with {AUTO_TRITON_ON_CPU_ENV}=1 and "
                f"{TRITON_INTERPRET_ENV}=1 (the interpreter is for tests)"
            )
        else:
            reason = impl.unavailable_reason(device)
        if reason is None:
            try:
                return impl.load(), KernelChoice(op, impl.name, "auto", tuple(passed_over))
            except KernelError as error:
                reason = str(error)
        passed_over.append((impl.name, reason))
    raise AssertionError(f"{op}: eager must always be available")


def eager_kernels() -> BoundKernels:
    """The reference binding: eager for every op (a model's default)."""
    return resolve_kernels({}, "eager", "cpu")


# The built-in implementations: op -> {implementation name: "module:attribute" under
# megatron_hybrid.kernels}. Each op's sub-package holds its eager reference beside the others.
_EAGER = {
    "rms_norm": "norms.eager:rms_norm",
    "add_rms_norm": "norms.eager:add_rms_norm",
    "gated_rms_norm": "norms.eager:gated_rms_norm",
    "activation.squared_relu": "activations.eager:squared_relu",
    "activation.swiglu": "activations.eager:swiglu",
    "causal_conv1d": "conv1d.eager:causal_conv1d",
    "ssd": "ssd.eager:ssd_chunked_scan",
    "causal_conv1d_step": "conv1d_step.eager:causal_conv1d_step",
    "ssd_step": "ssd_step.eager:ssd_step",
    "gated_delta_rule": "gated_delta_rule.eager:chunk_gated_delta_rule",
    "moe.experts": "moe_experts.eager:experts",
    "mlp": "mlp.eager:mlp",
    "rotary": "rotary.eager:rotary",
    "sparse_attention": "sparse_attention.eager:sparse_attention",
    "linear_cross_entropy": "linear_cross_entropy.eager:linear_cross_entropy",
}
_TRITON = {
    "moe.experts": "moe_experts.triton:experts",
    "rms_norm": "norms.triton:rms_norm",
    "add_rms_norm": "norms.triton:add_rms_norm",
    "gated_rms_norm": "norms.triton:gated_rms_norm",
    "activation.squared_relu": "activations.triton:squared_relu",
    "activation.swiglu": "activations.triton:swiglu",
    "causal_conv1d": "conv1d.triton:causal_conv1d",
    "ssd": "ssd.triton:ssd_chunked_scan",
    "causal_conv1d_step": "conv1d_step.triton:causal_conv1d_step",
    "ssd_step": "ssd_step.triton:ssd_step",
    "gated_delta_rule": "gated_delta_rule.triton:chunk_gated_delta_rule",
    "rotary": "rotary.triton:rotary",
    "linear_cross_entropy": "linear_cross_entropy.triton:linear_cross_entropy",
}
_PACKAGE = "megatron_hybrid.kernels"


def _fla_environment_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    return fla_hopper_triton_problem(
        torch.cuda.get_device_capability(device),
        triton_version,
        importlib.util.find_spec("tilelang") is not None,
    )


def fla_hopper_triton_problem(
    capability: tuple[int, int], triton_version: str, has_tilelang: bool
) -> str | None:
    """fla refuses its gated delta rule backward on Hopper with Triton 3.4 up to 3.7.0 (wrong
    results in chunk_bwd_dqkwg, fla issue #640) unless tilelang is installed; auto then binds
    the next implementation (triton) instead of failing at the first backward."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", triton_version)[:3])
    if capability[0] == 9 and (3, 4, 0) <= numbers < (3, 7, 1) and not has_tilelang:
        return (
            f"fla's gated delta rule computes wrong gradients with Triton {triton_version} on "
            "Hopper (fla issue #640): needs Triton >= 3.7.1, or tilelang installed"
        )
    return None


def _builtin_registry() -> KernelRegistry:
    registry = KernelRegistry(OPS)
    for op, target in _EAGER.items():
        registry.register(Implementation(op, "eager", f"{_PACKAGE}.{target}"))
    for op, target in _TRITON.items():
        registry.register(
            Implementation(
                op,
                "triton",
                f"{_PACKAGE}.{target}",
                device_types=("cuda",),
                requires=("triton",),
                install_hint="pip install triton",
                cpu_needs_triton_interpreter=True,
                priority=10,
            )
        )
    # flash-linear-attention's Triton kernels (optional; Megatron-Core's GDN runs on them):
    # auto prefers them to our triton gated delta rule wherever they import and compute right.
    registry.register(
        Implementation(
            "gated_delta_rule",
            "fla",
            f"{_PACKAGE}.gated_delta_rule.fla:chunk_gated_delta_rule",
            device_types=("cuda",),
            requires=("fla.ops.gated_delta_rule",),
            install_hint="pip install fla-core",
            priority=20,
            environment_problem=_fla_environment_problem,
        )
    )
    # tiled is opt-in only (a negative priority: auto never prefers it over eager).
    registry.register(
        Implementation("mlp", "tiled", f"{_PACKAGE}.mlp.tiled:tiled_mlp", priority=-10)
    )
    return registry


def _builtin_transforms() -> KernelRegistry:
    registry = KernelRegistry(TRANSFORMS)
    # torchao's float8 training: FP8 tensor cores (compute capability 8.9: Ada, Hopper, later).
    registry.register(
        Implementation(
            "float8_training",
            "torchao",
            f"{_PACKAGE}.float8.torchao:convert_to_float8_training",
            device_types=("cuda",),
            min_compute_capability=(8, 9),
            requires=("torchao.float8",),
            install_hint="pip install torchao, or pip install 'megatron-hybrid[fp8]'",
        )
    )
    return registry


REGISTRY = _builtin_registry()
TRANSFORM_REGISTRY = _builtin_transforms()
