"""Entry point of `scripts/pretrain_hybrid.py` and the `megatron-hybrid-train` command."""

from __future__ import annotations

import os
import shlex
import sys

import torch.distributed as dist

from megatron_hybrid.parallel.distributed import end_successful_run, shutdown_distributed
from megatron_hybrid.training.arguments import build_parser


def main(argv: list[str] | None = None) -> int:
    # The program as the user typed it (pretrain_hybrid.py or megatron-hybrid-train).
    parser = build_parser(os.path.basename(sys.argv[0]) if argv is None else "pretrain_hybrid.py")
    args = parser.parse_args(argv)  # unknown flags exit here with argparse's message
    from megatron_hybrid.training.nonfinite import TrainingDivergedError
    from megatron_hybrid.training.trainer import run_training

    try:
        result = run_training(args)
    except ValueError as error:  # PatternError, ConfigError, ...: the user's input, not a bug
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        shutdown_distributed(wait_for_peers=False)  # a peer may have failed: wait for none
        return 2
    except TrainingDivergedError as error:  # every rank raises it at the same iteration
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        shutdown_distributed(wait_for_peers=False)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(
            f"{parser.prog}: interrupted; nothing saved since the last checkpoint", file=sys.stderr
        )
        shutdown_distributed(wait_for_peers=False)
        return 130
    except BaseException:
        shutdown_distributed(wait_for_peers=False)
        raise
    if result.stopped_by is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        print(resume_hint(args, sys.argv if argv is None else [parser.prog, *argv]), flush=True)
    end_successful_run()  # run_training closed its checkpoints and logs
    return 0


def resume_hint(args, argv: list[str]) -> str:
    """How to go on after a stop: the command as it was typed, loading what it saved."""
    if not args.save:
        return "to keep the progress of a stopped run, give it --save DIR"
    command = list(argv)
    if args.load != args.save:
        command += ["--load", args.save]
    program = command[0]
    if os.environ.get("LOCAL_WORLD_SIZE"):  # launched by torchrun
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        launcher = ["torchrun", f"--nproc-per-node={os.environ['LOCAL_WORLD_SIZE']}"]
        if nodes != "1":
            launcher.append(f"--nnodes={nodes}")
        command = [*launcher, *command]
    elif program.endswith(".py"):
        command = ["python", *command]
    return f"resume with: {shlex.join(command)}"


if __name__ == "__main__":
    sys.exit(main())
