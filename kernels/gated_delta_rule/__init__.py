"""Gated DeltaNet's chunked gated delta rule.

The eager reference (eager.py) sits beside fla.py, which calls the flash-linear-attention
kernels (`fla-core`, optional) on CUDA; the registry (kernels/registry.py) binds one of them per
model."""
