"""Mamba2's depthwise causal conv1d.

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
