"""The dense MLP; the faster one (tiled.py) computes it over shards of the tokens.

The eager reference (eager.py) sits beside the faster implementation; the registry
(kernels/registry.py) binds one of them per model."""
