"""The trainer on real data: preprocessed indexed datasets, mock data, exact resume."""

from __future__ import annotations

import json

import pytest
from test_training import TINY

from megatron_hybrid.data.preprocess import main as preprocess
from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.cli import main as train_cli
from megatron_hybrid.training.trainer import run_training


@pytest.fixture(scope="module")
def dataset_prefix(tmp_path_factory):
    """A small JSONL corpus preprocessed with the byte tokenizer."""
    root = tmp_path_factory.mktemp("data")
    docs = [
        {"text": f"Document {i}: the quick brown fox jumps over the lazy dog {i * i} times."}
        for i in range(300)
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    assert (
        preprocess(
            [
                "--input",
                str(root / "corpus.jsonl"),
                "--output-prefix",
                str(root / "corpus"),
                "--append-eod",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return str(root / "corpus_text_document")


def train(*flags):
    return run_training(
        build_parser().parse_args(
            [*TINY, "--hybrid-layer-pattern", "[M-]*E", "--log-interval", "1", *flags]
        )
    )


def test_training_on_a_preprocessed_dataset_reduces_the_loss(dataset_prefix, capsys):
    result = train(
        "--data-path",
        dataset_prefix,
        "--train-iters",
        "15",
        "--eval-iters",
        "2",
        "--eval-interval",
        "15",
    )
    assert result.losses[-1] < result.losses[0] - 0.5
    assert 15 in result.val_losses
    assert "corpus_text_document" in capsys.readouterr().out  # the data summary line


def test_test_split_is_evaluated_after_training(dataset_prefix, tmp_path):
    result = train(
        "--data-path",
        dataset_prefix,
        "--split",
        "80,10,10",
        "--train-iters",
        "3",
        "--eval-iters",
        "2",
        "--log-dir",
        str(tmp_path),
    )
    assert result.test_loss is not None and result.test_loss > 0
    assert '"test_loss"' in (tmp_path / "metrics.jsonl").read_text()


def test_resume_on_a_dataset_continues_with_the_next_samples(dataset_prefix, tmp_path):
    flags = ("--data-path", dataset_prefix, "--train-iters", "6")
    straight = train(*flags)
    train(*flags, "--save", str(tmp_path), "--exit-interval", "3")
    resumed = train(*flags, "--load", str(tmp_path))
    assert resumed.losses == straight.losses[3:]


def test_mock_data_trains(capsys):
    result = train("--mock-data", "--train-iters", "3")
    assert len(result.losses) == 3


def test_other_tokenizer_without_data_is_a_clear_error(capsys):
    code = train_cli([*TINY, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])
    assert code == 2
    assert "embedded corpus is byte-level" in capsys.readouterr().err


def test_missing_dataset_names_the_file(tmp_path, capsys):
    code = train_cli([*TINY, "--data-path", str(tmp_path / "nothing")])
    assert code == 2
    assert "nothing" in capsys.readouterr().err
