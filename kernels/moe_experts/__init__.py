"""The MoE experts over expert-sorted tokens; the Triton one is a grouped GEMM.

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
