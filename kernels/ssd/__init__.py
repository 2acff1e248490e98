"""Mamba2's chunked SSD scan (state space dual); the Triton scan is split into its forward
(triton_fwd.py) and backward kernels: triton_bwd.py, and for the selectable "chunk" backward
variant triton_bwd_chunk.py (triton.py says which runs).

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
