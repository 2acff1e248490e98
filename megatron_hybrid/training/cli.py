"""Entry point of `scripts/pretrain_hybrid.py` and the `megatron-hybrid-train` command."""

from __future__ import annotations

import sys

from megatron_hybrid.parallel.distributed import end_successful_run, shutdown_distributed
from megatron_hybrid.training.arguments import build_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown flags exit here with argparse's message
    from megatron_hybrid.training.nonfinite import TrainingDivergedError
    from megatron_hybrid.training.trainer import run_training

    try:
        run_training(args)
    except ValueError as error:  # PatternError, ConfigError, ...: the user's input, not a bug
        print(f"pretrain_hybrid.py: error: {error}", file=sys.stderr)
        shutdown_distributed(wait_for_peers=False)  # a peer may have failed: wait for none
        return 2
    except TrainingDivergedError as error:  # every rank raises it at the same iteration
        print(f"pretrain_hybrid.py: error: {error}", file=sys.stderr)
        shutdown_distributed(wait_for_peers=False)
        return 1
    except BaseException:
        shutdown_distributed(wait_for_peers=False)
        raise
    end_successful_run()  # run_training closed its checkpoints and logs
    return 0


if __name__ == "__main__":
    sys.exit(main())
