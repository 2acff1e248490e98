"""scripts/preprocess_data.py: JSON lines -> indexed datasets, with every tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizer_files import SAMPLE_TEXTS, write_tokenizer_files

from megatron_hybrid.data.indexed_dataset import IndexedDataset
from megatron_hybrid.data.preprocess import build_parser, main, preprocess
from megatron_hybrid.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizers"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run(*flags: str) -> None:
    assert preprocess(build_parser().parse_args(list(flags)), log=lambda _: None)


def tokenizer_flags(kind: str, files) -> list[str]:
    return {
        "ByteTokenizer": [],
        "HuggingFaceTokenizer": [
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(files["tokenizer_json"]),
        ],
        "GPT2BPETokenizer": [
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            str(files["vocab"]),
            "--merge-file",
            str(files["merges"]),
        ],
        "NullTokenizer": ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50000"],
    }[kind]


@pytest.mark.parametrize(
    "kind", ["ByteTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"]
)
def test_preprocessing_stores_the_tokens_the_tokenizer_gives(tmp_path, files, kind):
    flags = tokenizer_flags(kind, files)
    if kind == "NullTokenizer":
        texts = ["17 4 999", "0 49999 12 12", "3"]
    else:
        texts = SAMPLE_TEXTS
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    run("--input", str(jsonl), "--output-prefix", str(tmp_path / "out"), "--append-eod", *flags)

    tokenizer = build_tokenizer(
        build_parser().parse_args(["--input", "x", "--output-prefix", "y", *flags])
    )
    dataset = IndexedDataset(tmp_path / "out_text_document")
    assert dataset.dtype == np.uint16
    assert dataset.num_documents == len(texts)
    for d, text in enumerate(texts):
        expected = np.append(tokenizer.encode(text), tokenizer.eod)
        np.testing.assert_array_equal(dataset.document(d), expected)


def test_without_append_eod_documents_end_without_eod(tmp_path):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"text": "abc"}, {"text": "de"}])
    run("--input", str(jsonl), "--output-prefix", str(tmp_path / "out"))
    dataset = IndexedDataset(tmp_path / "out_text_document")
    assert [dataset.document(d).tolist() for d in range(2)] == [[97, 98, 99], [100, 101]]


def test_each_json_key_becomes_its_own_dataset(tmp_path):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"title": "Hi", "body": "there"}])
    run(
        "--input",
        str(jsonl),
        "--output-prefix",
        str(tmp_path / "out"),
        "--json-keys",
        "title",
        "body",
    )
    assert bytes(IndexedDataset(tmp_path / "out_title_document")[0].astype(np.uint8)) == b"Hi"
    assert bytes(IndexedDataset(tmp_path / "out_body_document")[0].astype(np.uint8)) == b"there"


def test_an_empty_document_has_no_sequence_and_no_eod_like_megatron(tmp_path):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"text": "ab"}, {"text": ""}, {"text": "c"}])
    run("--input", str(jsonl), "--output-prefix", str(tmp_path / "out"), "--append-eod")
    dataset = IndexedDataset(tmp_path / "out_text_document")
    assert len(dataset) == 2 and dataset.num_documents == 3
    assert dataset.document(1).size == 0


def test_a_vocabulary_beyond_uint16_is_stored_as_int32(tmp_path):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"text": "70000 1"}])
    run(
        "--input",
        str(jsonl),
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "100000",
    )
    dataset = IndexedDataset(tmp_path / "out_text_document")
    assert dataset.dtype == np.int32 and dataset[0].tolist() == [70000, 1]


def test_parallel_workers_write_the_same_files_as_one(tmp_path):
    records = [{"text": f"document {i}: " + "words " * (i % 13)} for i in range(700)]
    jsonl = write_jsonl(tmp_path / "in.jsonl", records)
    run("--input", str(jsonl), "--output-prefix", str(tmp_path / "one"), "--append-eod")
    run(
        "--input",
        str(jsonl),
        "--output-prefix",
        str(tmp_path / "two"),
        "--append-eod",
        "--workers",
        "2",
    )
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one_text_document{suffix}").read_bytes() == (
            tmp_path / f"two_text_document{suffix}"
        ).read_bytes()


def test_a_missing_key_names_the_file_line_and_keys(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"text": "ok"}, {"content": "no text"}])
    assert main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "in.jsonl line 2: no key 'text' (keys: 'content')" in message
    assert not list(tmp_path.glob("out*"))  # nothing half-written is left behind


def test_a_line_that_is_not_json_is_named(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    assert (
        main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out")]) == 2
    )
    assert "in.jsonl line 2: not valid JSON" in capsys.readouterr().err


def test_the_script_runs_from_the_command_line(tmp_path):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "preprocess_data.py"),
            "--input",
            str(jsonl),
            "--output-prefix",
            str(tmp_path / "out"),
            "--append-eod",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 1 documents, 6 tokens" in result.stderr
    assert IndexedDataset(tmp_path / "out_text_document")[0].tolist()[-1] == 256
