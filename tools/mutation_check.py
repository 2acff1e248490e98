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
    Mutation(
        "pipeline-eval-loss-weight", "megatron_hybrid/training/trainer.py",
        "loss_weight=dims.pp if pipeline.has_last else 0.0",
        "loss_weight=1.0 if pipeline.has_last else 0.0",
        (f"{LAYOUTS}[pp2]",),
        "validation loss under pipeline parallelism: the last stage's loss weight set to 1"),
)


def apply(mutation: Mutation) -> str:
    """Edit the file; return its original text. Raises ValueError if the edit no longer applies."""
    path = REPO / mutation.file
    original = path.read_text()
    count = original.count(mutation.old)
    if count != 1:
        raise ValueError(f"{mutation.name}: its old text occurs {count} times in {mutation.file} "
                         "(expected once): update the mutation to the current code")
    path.write_text(original.replace(mutation.old, mutation.new))
    return original


def run(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, last output line): outcome "caught", "SURVIVED" or "timeout"."""
    original = apply(mutation)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               *mutation.tests], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        outcome = "caught" if done.returncode == 1 else (
            "SURVIVED" if done.returncode == 0 else f"error (pytest exit {done.returncode})")
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else done.stderr.strip()[-200:]
    except subprocess.TimeoutExpired:
        outcome, summary = "timeout", f"no result within {timeout:.0f} s"
    finally:
        (REPO / mutation.file).write_text(original)
    return outcome, time.perf_counter() - start, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds per mutation's test run")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write results here")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTATIONS}
    unknown = [name for name in args.only if name not in names]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in selected:
            print(f"{m.name:32s} {m.file}: {m.what}")
        return 0
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *{m.file for m in selected}],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    if dirty:
        print(f"uncommitted changes in files this check edits; commit or stash them first:\n"
              f"{dirty}", file=sys.stderr)
        return 2
    for m in selected:  # every edit must apply before any test runs
        (REPO / m.file).write_text(apply(m))
    results = []
    for index, m in enumerate(selected, 1):
        print(f"[{index}/{len(selected)}] {m.name}: {m.what} ...", flush=True)
        outcome, seconds, summary = run(m, args.timeout)
        results.append({"name": m.name, "file": m.file, "what": m.what, "outcome": outcome,
                        "seconds": round(seconds, 1), "pytest": summary})
        print(f"    {outcome} in {seconds:.0f} s ({summary})", flush=True)
    print(f"\n{'mutation':32s} {'outcome':10s} seconds")
    for r in results:
        print(f"{r['name']:32s} {r['outcome']:10s} {r['seconds']:7.0f}")
    survivors = [r["name"] for r in results if r["outcome"] != "caught"]
    print(f"\n{len(results) - len(survivors)} of {len(results)} caught"
          + (f"; not caught: {', '.join(survivors)}" if survivors else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
