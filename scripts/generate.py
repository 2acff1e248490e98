#!/usr/bin/env python3
"""Sample text from a megatron-hybrid checkpoint: `python scripts/generate.py -h`.

Same as the installed `megatron-hybrid-generate` command."""

import sys

from megatron_hybrid.training.generate import main

if __name__ == "__main__":
    sys.exit(main())
