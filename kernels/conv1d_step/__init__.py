"""One decoding step of Mamba2's depthwise causal conv1d: the window of the last inputs advanced
by one token (kernels/conv1d/ runs the conv over a whole sequence).

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
