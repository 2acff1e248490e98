"""Top-k sparse attention (DeepSeek sparse attention's core). Only the eager reference (eager.py)
so far; the registry (kernels/registry.py) binds it."""
