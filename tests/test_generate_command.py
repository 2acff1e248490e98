"""`megatron-hybrid-generate` (megatron_hybrid.training.generate.py): samples from a checkpoint with
the tokenizer it records (training copies the tokenizer's files in), or the one the flags name;
the committed 2026-12 fixture, which records none, still samples with flags."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from test_training import TINY
from tokenizer_files import write_tokenizer_files

from megatron_hybrid.checkpointing import files
from megatron_hybrid.checkpointing.consolidated import model_config_of
from megatron_hybrid.checkpointing.manager import load_checkpoint
from megatron_hybrid.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer
from megatron_hybrid.generation import GREEDY, generate
from megatron_hybrid.model import HybridModel
from megatron_hybrid.training.arguments import build_parser
from megatron_hybrid.training.generate import main
from megatron_hybrid.training.trainer import run_training

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from make_checkpoint_fixture import FIXTURE, load_fixture  # noqa: E402

PATTERN = "[M-]*E"  # fused: the command builds the layout the checkpoint records
TRAIN = [*TINY, "--hybrid-layer-pattern", PATTERN, "--train-iters", "2", "--save-interval", "2"]
SAMPLE = ["--greedy", "--max-new-tokens", "10", "--device", "cpu", "--ignore-eod"]


def train_and_save(save: Path, *flags: str):
    return run_training(build_parser().parse_args([*TRAIN, "--save", str(save), *flags]))


def command(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def greedy_texts(model, tokenizer, prompts: list[str], new: int = 10) -> list[str]:
    ids = [list(tokenizer.encode(p)) for p in prompts]
    samples = generate(model, ids, new, GREEDY, vocab_limit=tokenizer.vocab_size)
    return [p + tokenizer.decode(s) for p, s in zip(prompts, samples, strict=True)]


def printed(texts: list[str]) -> str:
    return "".join(text + "\n\n" for text in texts)


def test_a_training_checkpoint_samples_with_its_recorded_tokenizer(tmp_path, capsys):
    result = train_and_save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "iter_0000002" / "checkpoint.json").read_text())
    assert meta["tokenizer"] == {"tokenizer_type": "ByteTokenizer", "vocab_size": None}
    capsys.readouterr()

    code, out, err = command(
        capsys, tmp_path / "ckpt", "--prompt", "The ", "--prompt", "a", *SAMPLE
    )
    assert code == 0, err
    # The trained model itself, decoded in this process, gives the same text.
    assert out == printed(greedy_texts(result.model, ByteTokenizer(), ["The ", "a"]))


def test_the_recorded_tokenizer_files_travel_with_the_checkpoint(tmp_path, capsys):
    tokenizer_json = write_tokenizer_files(tmp_path / "tokenizer")["tokenizer_json"]
    flags = ["--mock-data", "--tokenizer-type", "HuggingFaceTokenizer"]
    train_and_save(tmp_path / "ckpt", *flags, "--tokenizer-model", str(tokenizer_json))
    directory = tmp_path / "ckpt" / "iter_0000002"
    meta = json.loads((directory / "checkpoint.json").read_text())
    assert meta["tokenizer"]["tokenizer_model"] == "tokenizer.json"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(meta["files"])  # checksummed
    # Elsewhere, with the original tokenizer files gone.
    moved = tmp_path / "moved"
    shutil.move(directory, moved)
    original = HuggingFaceTokenizer(str(tokenizer_json))
    shutil.rmtree(tmp_path / "tokenizer")
    capsys.readouterr()

    code, out, err = command(capsys, moved, "--prompt", "def main", *SAMPLE)
    assert code == 0, err
    model = HybridModel(recorded_config(moved))
    load_checkpoint(moved, model, None, model.config)
    assert out == printed(greedy_texts(model, original, ["def main"]))
    # The EOD the tokenizer_config.json names, not the first known end-of-text token.
    assert original.eod == original._backend.token_to_id("</s>")


def recorded_config(directory: Path):
    return model_config_of(directory, files.read_checkpoint_metadata(directory))


def test_the_2026_12_fixture_needs_tokenizer_flags_and_then_samples(capsys):
    code, out, err = command(capsys, FIXTURE, *SAMPLE)
    assert code == 2 and out == ""
    assert "checkpoint.json records no tokenizer" in err and "--tokenizer-type" in err

    code, out, err = command(
        capsys, FIXTURE, "--tokenizer-type", "ByteTokenizer", "--prompt", "x = ", *SAMPLE
    )
    assert code == 0, err
    model, _ = load_fixture(FIXTURE)
    assert out == printed(greedy_texts(model.eval(), ByteTokenizer(), ["x = "]))


def test_without_a_prompt_a_sample_starts_from_end_of_document(tmp_path, capsys):
    result = train_and_save(tmp_path / "ckpt")
    capsys.readouterr()
    code, out, err = command(capsys, tmp_path / "ckpt", *SAMPLE)
    assert code == 0, err
    tokenizer = ByteTokenizer()
    (sample,) = generate(result.model, [[tokenizer.eod]], 10, GREEDY, tokenizer.vocab_size)
    assert out == printed([tokenizer.decode(sample)])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(capsys):
    code, _, err = command(
        capsys, FIXTURE, "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", *SAMPLE
    )
    assert code == 2
    assert "has 1001 tokens, more than the model's vocabulary of 384" in err


def test_a_tokenizer_record_this_version_cannot_read_is_named(tmp_path, capsys):
    train_and_save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "iter_0000002" / "checkpoint.json"
    meta = json.loads(path.read_text())
    meta["tokenizer"] = {"tokenizer_type": "SentencePieceTokenizer"}
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    code, _, err = command(capsys, tmp_path / "ckpt", *SAMPLE)
    assert code == 2
    assert (
        "tokenizer record" in err and "SentencePieceTokenizer" in err and "--tokenizer-type" in err
    )


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "2")])
def test_bad_sampling_flags_are_named(capsys, flag, value):
    code, _, err = command(capsys, FIXTURE, "--tokenizer-type", "ByteTokenizer", flag, value)
    assert code == 2 and flag.lstrip("-").replace("-", "_") in err


def test_an_empty_or_missing_checkpoint_is_named(tmp_path, capsys):
    code, _, err = command(capsys, tmp_path, *SAMPLE)
    assert code == 2 and err.startswith("megatron-hybrid-generate: error: ")
    assert str(tmp_path) in err


def test_an_hf_import_keeps_the_tokenizer_of_its_folder(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_hf_nemotron_h import random_hf_model

    from megatron_hybrid.checkpointing.convert import main as convert

    hf_dir = tmp_path / "hf"
    random_hf_model(["linear_attention", "moe"], vocab_size=448).save_pretrained(hf_dir)
    tokenizer_json = write_tokenizer_files(tmp_path / "tokenizer")["tokenizer_json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_json.parent / name, hf_dir / name)
    assert convert(["from-hf", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()

    code, out, err = command(capsys, tmp_path / "ckpt", "--prompt", "def main", *SAMPLE)
    assert code == 0, err
    directory = tmp_path / "ckpt" / "iter_0000000"
    model = HybridModel(recorded_config(directory))
    load_checkpoint(directory, model, None, model.config)
    tokenizer = HuggingFaceTokenizer(str(tokenizer_json))
    assert out == printed(greedy_texts(model, tokenizer, ["def main"]))
