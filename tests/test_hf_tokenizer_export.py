"""A Hugging Face export carries its tokenizer: AutoTokenizer.from_pretrained on the export
gives the ids the model was trained on, for every tokenizer with a text form."""

from __future__ import annotations

import pytest
from tokenizer_files import SAMPLE_TEXTS, write_tokenizer_files

from megatron_hybrid.checkpointing.hf_tokenizer import write_hf_tokenizer
from megatron_hybrid.data.tokenizer import (
    ByteTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizers"))


def tokenizers(files):
    return {
        "byte": ByteTokenizer(),
        "hf": HuggingFaceTokenizer(str(files["tokenizer_json"])),
        "gpt2": GPT2BPETokenizer(str(files["vocab"]), str(files["merges"])),
    }


@pytest.mark.parametrize("kind", ["byte", "hf", "gpt2"])
def test_auto_tokenizer_reads_the_export_with_the_same_ids(tmp_path, files, kind):
    ours = tokenizers(files)[kind]
    line = write_hf_tokenizer(ours, tmp_path, max_length=256)
    assert line.startswith("wrote tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [*SAMPLE_TEXTS, "Héllo wörld €\n\ttab"]:
        if kind in ("byte", "gpt2") and "<|endoftext|>" in text:
            continue  # ours read the EOD's spelling in text as text (Megatron's), HF as EOD
        assert theirs(text)["input_ids"] == ours.encode(text).tolist(), text
    assert theirs.eos_token_id == ours.eod
    if kind == "byte":
        ids = ours.encode("Héllo\n")
        assert theirs.decode(ids) == "Héllo\n"
        assert theirs.model_max_length == 256


def test_the_hf_tokenizers_own_config_is_kept(tmp_path, files):
    write_hf_tokenizer(HuggingFaceTokenizer(str(files["tokenizer_json"])), tmp_path, None)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.eos_token == "</s>"  # from the source tokenizer_config.json, not a guess


def test_a_null_tokenizer_writes_nothing(tmp_path):
    line = write_hf_tokenizer(NullTokenizer(100), tmp_path, None)
    assert "no tokenizer written" in line and not any(tmp_path.iterdir())


def test_a_trained_runs_export_loads_with_auto_tokenizer(tmp_path, capsys):
    """The issue as a user met it: train on the embedded data, export, tokenize with HF."""
    from test_training import TINY

    from megatron_hybrid.checkpointing.convert import main as convert
    from megatron_hybrid.training.cli import main as train

    exportable = [
        "--hybrid-layer-pattern", "[M-]*E", "--moe-router-score-function", "sigmoid",
        "--moe-shared-expert-intermediate-size", "16", "--moe-router-enable-expert-bias",
    ]  # fmt: skip
    save = tmp_path / "ckpt"
    assert train([*TINY, *exportable, "--train-iters", "2", "--save", str(save)]) == 0
    assert convert(["to-hf", str(save), str(tmp_path / "hf")]) == 0
    assert "wrote tokenizer.json (ByteTokenizer" in capsys.readouterr().out
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "def main():\n    return 'ok'\n"
    assert theirs(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
