"""Entry point of `scripts/pretrain_hybrid.py` and the `megatron-hybrid-train` command."""

from __future__ import annotations

import sys

import torch.distributed as dist

from megatron_hybrid.training.arguments import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags exit here with argparse's message
    from megatron_hybrid.training.trainer import run_training

    try:
        run_training(args)
        if dist.is_initialized():
            # Every rank finishes before any tears its process group down: gloo aborts a
            # process ("terminate called without an active exception") whose group is destroyed
            # while a peer is still finishing (seen under load in CI).
            dist.barrier()
    except ValueError as error:  # PatternError, ConfigError, ...: the user's input, not a bug
        print(f"pretrain_hybrid.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
