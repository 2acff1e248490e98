"""JSON lines -> Megatron indexed datasets (`megatron-hybrid-preprocess`, preprocess_data.py).

    megatron-hybrid-preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json \\
        --append-eod --workers 8

writes `data/corpus_text_document.bin/.idx` (Megatron's naming: `{prefix}_{key}_document`), one
pair per --json-keys key, one sequence per document, ids as uint16 when the vocabulary fits,
else int32. The output is the same for any number of workers.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from megatron_hybrid.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from megatron_hybrid.data.tokenizer import add_tokenizer_args, build_tokenizer

_LINES_PER_TASK = 256


class PreprocessError(ValueError):
    """Input that cannot be preprocessed; the message names the file and line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize JSON lines into Megatron indexed datasets (.bin/.idx).",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="a JSON-lines file, one document a line")
    parser.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys whose text to tokenize; one output dataset per key",
    )
    parser.add_argument(
        "--output-prefix", required=True, help="writes OUTPUT_PREFIX_{key}_document.bin/.idx"
    )
    parser.add_argument(
        "--append-eod",
        action="store_true",
        help="end every document with the tokenizer's end-of-document token",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument(
        "--log-interval", type=int, default=10_000, help="report progress every N documents"
    )
    add_tokenizer_args(parser)
    return parser


def output_prefix(args: argparse.Namespace, key: str) -> str:
    return f"{args.output_prefix}_{key}_document"


# -- workers -------------------------------------------------------------------------------------

_tokenizer = None
_args = None


def _init_worker(args: argparse.Namespace) -> None:
    global _tokenizer, _args
    _args = args
    _tokenizer = build_tokenizer(args)


def _encode_lines(task: tuple[int, list[str]]) -> tuple[list[dict], int]:
    """Tokenize the lines of one task: per document, {key: (tokens, sequence lengths)}; plus
    the bytes read. Blank lines are skipped."""
    first_line, lines = task
    documents = []
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PreprocessError(
                f"{_args.input} line {number}: not valid JSON ({error})"
            ) from None
        if not isinstance(record, dict):
            raise PreprocessError(
                f"{_args.input} line {number}: expected a JSON object, found "
                f"{type(record).__name__}"
            )
        document = {}
        for key in _args.json_keys:
            if key not in record:
                raise PreprocessError(
                    f"{_args.input} line {number}: no key {key!r} (keys: "
                    f"{', '.join(map(repr, record))}); choose the text keys with --json-keys"
                )
            text = record[key]
            pieces = text if isinstance(text, list) else [text]
            if not all(isinstance(p, str) for p in pieces):
                raise PreprocessError(
                    f"{_args.input} line {number}: {key!r} holds "
                    f"{type(text).__name__}; expected a string"
                )
            # As Megatron: one sequence per non-empty piece (a list holds pre-split sentences),
            # EOD after the last; an empty document gets no sequence.
            encoded = [ids for ids in map(_tokenizer.encode, pieces) if ids.size]
            if encoded and _args.append_eod:
                encoded[-1] = np.append(encoded[-1], _tokenizer.eod)
            tokens = np.concatenate(encoded) if encoded else np.empty(0, np.int64)
            document[key] = (tokens, [ids.size for ids in encoded])
        documents.append(document)
    return documents, sum(len(line.encode("utf-8")) for line in lines)


def _tasks(path: str) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="utf-8") as f:
        lines, first = [], 1
        for number, line in enumerate(f, start=1):
            lines.append(line)
            if len(lines) == _LINES_PER_TASK:
                yield first, lines
                lines, first = [], number + 1
        if lines:
            yield first, lines


def _encode_in_order(pool, tasks, depth: int):
    """The pool's results in input order, with at most `depth` tasks in flight (Pool.imap would
    read the whole input into its queue when tokenizing is slower than reading)."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_lines, (task,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# -- driver --------------------------------------------------------------------------------------


def preprocess(args: argparse.Namespace, log=print) -> dict[str, str]:
    """Tokenize args.input into one indexed dataset per JSON key; returns {key: prefix}."""
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"--input {args.input}: no such file")
    if args.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {args.workers}")
    tokenizer = build_tokenizer(args)  # fails here, in the parent, on bad tokenizer flags
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    prefixes = {key: output_prefix(args, key) for key in args.json_keys}
    writers = {key: IndexedDatasetWriter(prefix, dtype) for key, prefix in prefixes.items()}
    log(
        f"tokenizing {args.input} with {tokenizer.name} (vocab {tokenizer.vocab_size}, "
        f"stored as {dtype.name}) on {args.workers} worker(s)"
    )

    start, documents, tokens, read_bytes, next_report = time.time(), 0, 0, 0, args.log_interval
    pool = None
    try:
        if args.workers == 1:
            _init_worker(args)
            results = map(_encode_lines, _tasks(args.input))
        else:
            pool = multiprocessing.get_context("spawn").Pool(
                args.workers, initializer=_init_worker, initargs=(args,)
            )
            results = _encode_in_order(pool, _tasks(args.input), 4 * args.workers)
        for batch, batch_bytes in results:
            for document in batch:
                for key, (ids, lengths) in document.items():
                    writers[key].add_document(ids, lengths)
                    tokens += ids.size
            documents += len(batch)
            read_bytes += batch_bytes
            if documents >= next_report:
                elapsed = max(time.time() - start, 1e-9)
                log(
                    f"  {documents} documents, {tokens} tokens ({documents / elapsed:.0f} docs/s, "
                    f"{read_bytes / elapsed / 2**20:.2f} MB/s)"
                )
                next_report += args.log_interval
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for writer in writers.values():
        writer.finalize()
    elapsed = time.time() - start
    log(
        f"wrote {documents} documents, {tokens} tokens in {elapsed:.1f}s: "
        + ", ".join(f"{p}.bin/.idx" for p in prefixes.values())
    )
    return prefixes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preprocess(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
