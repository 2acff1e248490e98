"""Mutation check: apply deliberate bugs one at a time and see whether the tests catch them.

Each mutation is a literal edit of one source file (an `old` text that must occur exactly once,
replaced by `new`) plus the tests that should catch it. The edit is made in place (the editable
install then imports it), the tests run, and the file is restored whatever happens. A mutation
that no test catches is a *survivor*: a promise of the code that nothing checks.

    python tools/mutation_check.py            # every mutation; exit 1 if any survives
    python tools/mutation_check.py --list
    python tools/mutation_check.py --only never-clip --only finetune-skips-load

Run it on demand (it takes minutes), not in CI. Add a mutation for every bug a review finds
slipping through the suite, next to the test written to catch it.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or paths that must fail under the mutation
    what: str  # the bug in a few words


LAYOUTS = "tests/test_parallel_layouts.py::test_layout_matches_one_process"
MUTATIONS: tuple[Mutation, ...] = (
    # The seven bugs that passed the whole suite on 2026-12-05.
    Mutation(
        "never-clip",
        "megatron_hybrid/parallel/grad_norm.py",
        "        if coef < 1.0:",
        "        if coef < 0.0:",
        ("tests/test_grad_clipping.py",),
        "gradient clipping never scales the gradients",
    ),
    Mutation(
        "trainer-never-clips",
        "megatron_hybrid/training/trainer.py",
        "self.max_grad_norm = training.clip_grad if training.clip_grad > 0 else math.inf",
        "self.max_grad_norm = math.inf",
        ("tests/test_grad_clipping.py",),
        "the trainer asks for no clipping whatever --clip-grad says",
    ),
    Mutation(
        "pipeline-eval-loss-weight",
        "megatron_hybrid/training/trainer.py",
        "(self.dims.pp if pipeline.has_last else 0.0)",
        "(1.0 if pipeline.has_last else 0.0)",
        (f"{LAYOUTS}[pp2]",),
        "validation loss under pipeline parallelism: the last stage's loss weight set to 1",
    ),
    Mutation(
        "sigmoid-aux-loss-unnormalized",
        "megatron_hybrid/layers/moe.py",
        "scores_NE = scores_NE / (scores_NE.sum(dim=-1, keepdim=True) + 1e-20)",
        "scores_NE = scores_NE",
        ("tests/test_layers.py::test_moe_aux_loss_matches_per_token_switch_loss",),
        "MoE aux loss with sigmoid scores skips their per-token normalization",
    ),
    Mutation(
        "eval-forwards-count-tokens",
        "megatron_hybrid/layers/moe.py",
        "        if self.training:\n            with torch.no_grad():\n"
        "                self.tokens_per_expert +=",
        "        if True:\n            with torch.no_grad():\n"
        "                self.tokens_per_expert +=",
        ("tests/test_layers.py::test_eval_forwards_leave_the_expert_bias_token_counts_unchanged",),
        "MoE routing counts include evaluation forwards",
    ),
    Mutation(
        "finetune-skips-load",
        "megatron_hybrid/training/trainer.py",
        "            checkpoint.load,\n            model,\n",
        "            checkpoint.load,\n"
        '            __import__("copy").deepcopy(model) if checkpoint.finetune else model,\n',
        (
            "tests/test_load_options.py::test_finetune_trains_the_checkpoint_weights_from_iteration_0",
        ),
        "--finetune loads the weights into a copy the run never uses",
    ),
    Mutation(
        "norm-backward-prefetches-current-tile",
        "kernels/norms/triton.py",
        "            DSUM,\n            rows + BLOCK_M,\n",
        "            DSUM,\n            rows,\n",
        (
            "tests/test_triton_norms.py::"
            "test_norms_match_eager_with_several_row_tiles_per_backward_program",
        ),
        "Triton norm backward prefetches the current row tile instead of the next",
    ),
    Mutation(
        "rng-not-restored",
        "megatron_hybrid/training/trainer.py",
        "        loaded.restore_rng()",
        "        pass",
        ("tests/test_load_options.py::test_resume_restores_the_saved_rng_streams",),
        "resume does not restore the RNG streams",
    ),
    # Found by later reviews.
    Mutation(
        "fused-block-wrong-norm",
        "megatron_hybrid/blocks.py",
        "self.channel_norm.add_and_norm(mixed_BTH, x_BTH)",
        "self.sequence_norm.add_and_norm(mixed_BTH, x_BTH)",
        ("tests/test_model.py::test_fused_and_unfused_models_give_identical_logits",),
        "a fused block normalizes its channel side with the sequence side's norm weight",
    ),
    Mutation(
        "ssd-drops-carried-state",
        "kernels/ssd/triton_fwd.py",
        "acc = mm(c_l, state_t, DOT_DTYPE, INTERPRET) * tl.exp(da_l)[:, None]",
        "acc = mm(c_l, state_t, DOT_DTYPE, INTERPRET) * 0.0",
        (
            "tests/test_kernel_registry.py::"
            "test_model_with_triton_kernels_matches_eager_logits_and_gradients",
        ),
        "the Triton SSD forgets the state carried between chunks",
    ),
    Mutation(
        "lr-schedule-warning-dropped",
        "megatron_hybrid/training/trainer.py",
        "        reporter.message(warning)",
        "        pass",
        (
            "tests/test_load_options.py::test_resume_with_other_schedule_flags_warns_naming_each_change",
        ),
        "resume with other schedule flags says nothing",
    ),
    Mutation(
        "prune-before-save",
        "checkpointing/manager.py",
        "        writer = dcp.FileSystemWriter(str(partial))",
        "        if self._is_main and self.keep_last:  # make room first\n"
        "            files.prune(self.save_dir, self.keep_last - 1)\n"
        "        writer = dcp.FileSystemWriter(str(partial))",
        ("tests/test_checkpoint_pruning.py",),
        "--keep-last prunes before the new checkpoint is complete",
    ),
    Mutation(
        "nan-check-ignored",
        "megatron_hybrid/training/nonfinite.py",
        "        if float(all_reduce_mean(flag)) == 0:",
        "        if True:",
        ("tests/test_nonfinite.py",),
        "a NaN loss or gradient norm is not noticed",
    ),
    Mutation(
        "default-global-batch-ignores-dp",
        "megatron_hybrid/training/arguments.py",
        "        training.global_batch_size = per_micro_step",
        "        training.global_batch_size = training.micro_batch_size",
        (
            "tests/test_flag_checks.py",
            "tests/test_distributed.py::test_torchrun_with_no_batch_flags_trains",
        ),
        "--global-batch-size defaults to the micro batch, not micro batch x dp",
    ),
)


def apply(mutation: Mutation) -> str:
    """Edit the file; return its original text. Raises ValueError if the edit no longer applies."""
    path = REPO / mutation.file
    original = path.read_text()
    count = original.count(mutation.old)
    if count != 1:
        raise ValueError(
            f"{mutation.name}: its old text occurs {count} times in {mutation.file} "
            "(expected once): update the mutation to the current code"
        )
    path.write_text(original.replace(mutation.old, mutation.new))
    return original


def run(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, last output line): outcome "caught", "SURVIVED" or "timeout"."""
    original = apply(mutation)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        outcome = (
            "caught"
            if done.returncode == 1
            else ("SURVIVED" if done.returncode == 0 else f"error (pytest exit {done.returncode})")
        )
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else done.stderr.strip()[-200:]
    except subprocess.TimeoutExpired:
        outcome, summary = "timeout", f"no result within {timeout:.0f} s"
    finally:
        (REPO / mutation.file).write_text(original)
    return outcome, time.perf_counter() - start, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this mutation (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per mutation's test run"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="also write results here")
    args = parser.parse_args(argv)
    # A stopped check must still restore the file it edited: SIGTERM runs the finally blocks.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    names = {m.name for m in MUTATIONS}
    unknown = [name for name in args.only if name not in names]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in selected:
            print(f"{m.name:40s} {m.file}: {m.what}")
        return 0
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *{m.file for m in selected}],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if dirty:
        print(
            f"uncommitted changes in files this check edits; commit or stash them first:\n{dirty}",
            file=sys.stderr,
        )
        return 2
    for m in selected:  # every edit must apply before any test runs
        (REPO / m.file).write_text(apply(m))
    results = []
    for index, m in enumerate(selected, 1):
        print(f"[{index}/{len(selected)}] {m.name}: {m.what} ...", flush=True)
        outcome, seconds, summary = run(m, args.timeout)
        results.append(
            {
                "name": m.name,
                "file": m.file,
                "what": m.what,
                "outcome": outcome,
                "seconds": round(seconds, 1),
                "pytest": summary,
            }
        )
        print(f"    {outcome} in {seconds:.0f} s ({summary})", flush=True)
    width = max(len(r["name"]) for r in results) if results else 8
    print(f"\n{'mutation':{width}s} {'outcome':10s} seconds")
    for r in results:
        print(f"{r['name']:{width}s} {r['outcome']:10s} {r['seconds']:7.0f}")
    survivors = [r["name"] for r in results if r["outcome"] != "caught"]
    print(
        f"\n{len(results) - len(survivors)} of {len(results)} caught"
        + (f"; not caught: {', '.join(survivors)}" if survivors else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
