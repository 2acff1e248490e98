#!/usr/bin/env python3
"""Pretrain a hybrid Mamba2/attention/MLP/MoE model: `python scripts/pretrain_hybrid.py --help`.

Same as the installed `megatron-hybrid-train` command."""

import sys

from megatron_hybrid.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
