"""RMSNorm, the residual add fused with it, and Mamba2's gated, grouped RMSNorm.

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
