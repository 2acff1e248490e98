"""Surprises a new user met, each now a clear error or one clear line from rank 0: an empty
--data-path, --bf16 on the CPU, --split on the embedded corpus, an empty test share, and the
order and wording of the log."""

from __future__ import annotations

import warnings

from test_training import TINY
from test_training_data import dataset_prefix  # noqa: F401 (a fixture)

from megatron_hybrid.training.cli import main

PATTERN = ["--hybrid-layer-pattern", "M*-", "--train-iters", "2", "--log-interval", "1"]


def run_cli(capsys, *flags):
    """(exit status, stdout, stderr) of the training command."""
    code = main(list(flags))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_empty_data_path_is_an_error_not_the_embedded_corpus(capsys):
    code, _, err = run_cli(capsys, *TINY, *PATTERN, "--data-path")
    assert code == 2
    assert "--data-path was given no dataset (an empty shell variable?)" in err
    code, _, err = run_cli(capsys, *TINY, *PATTERN, "--train-data-path", "")
    assert code == 2 and "--train-data-path was given no dataset" in err


def test_bf16_on_the_cpu_says_so_once_and_trains_in_float32(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, _ = run_cli(capsys, *TINY, *PATTERN, "--bf16")  # --device auto, no GPU
    assert code == 0
    assert out.count("--bf16 applies on CUDA only: this run on the CPU trains in float32") == 1
    assert not [w for w in caught if "autocast" in str(w.message).lower()]


def test_split_on_the_embedded_corpus_is_named(capsys):
    code, out, _ = run_cli(capsys, *TINY, *PATTERN, "--split", "90,10,0")
    assert code == 0
    assert "--split 90,10,0 applies to --data-path datasets" in out


def test_an_empty_test_share_is_one_calm_line(capsys, dataset_prefix):  # noqa: F811
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(capsys, *TINY, *PATTERN, "--data-path", dataset_prefix)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "test data" in line or "no test data" in line]
    assert len(notes) == 2  # the dataset left out, then: no test evaluation
    assert notes[0].startswith("data: test data leaves out")
    assert notes[1] == "data: no test data: evaluation on the test split is skipped"
    assert "WARNING" not in err and not caught


def test_the_log_line_comes_before_its_save_and_micro_batch_is_singular(capsys, tmp_path):
    code, out, _ = run_cli(capsys, *TINY, *PATTERN, "--save", str(tmp_path), "--save-interval", "1")
    assert code == 0
    lines = out.splitlines()
    logged = next(i for i, line in enumerate(lines) if "1/2 loss" in line)
    saved = next(i for i, line in enumerate(lines) if "saved checkpoint" in line)
    assert logged < saved
    assert "(1 micro-batch of 4 per rank)" in out
