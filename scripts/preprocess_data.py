#!/usr/bin/env python3
"""Tokenize JSON lines into Megatron indexed datasets: `python scripts/preprocess_data.py --help`.

Same as the installed `megatron-hybrid-preprocess` command."""

import sys

from megatron_hybrid.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
