"""Mamba2's chunked SSD scan (state space dual); the Triton scan is split into its forward
(triton_fwd.py) and backward (triton_bwd.py) kernels.

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
