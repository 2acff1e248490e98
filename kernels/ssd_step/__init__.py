"""One decoding step of Mamba2's SSM: the recurrent state advanced by one token (the chunked scan
of kernels/ssd/ prefills it).

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
