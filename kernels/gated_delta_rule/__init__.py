"""Gated DeltaNet's chunked gated delta rule.

The eager reference (eager.py) sits beside triton.py, which runs the eager op's chunk-parallel
preparation and carries the state over the chunks in Triton kernels, and fla.py, which calls the
flash-linear-attention kernels (`fla-core`, optional) on CUDA; the registry
(kernels/registry.py) binds one of them per model: `auto` on CUDA prefers fla where it is
installed and usable, else triton."""
