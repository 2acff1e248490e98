#!/usr/bin/env python3
"""Inspect and convert megatron-hybrid checkpoints: `python scripts/convert_checkpoint.py -h`.

Same as the installed `megatron-hybrid-convert` command."""

import sys

from megatron_hybrid.checkpointing.convert import main

if __name__ == "__main__":
    sys.exit(main())
