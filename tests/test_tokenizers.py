"""Tokenizers behind --tokenizer-type, built from files made in the test (no download)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from tokenizer_files import SAMPLE_TEXTS, ReferenceGPT2Encoder, write_tokenizer_files

from megatron_hybrid.data.tokenizer import (
    ByteTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    TokenizerError,
    add_tokenizer_args,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizers"))


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tokenizer_args(parser)
    return parser.parse_args(list(flags))


def test_the_default_is_the_byte_tokenizer():
    tokenizer = build_tokenizer(parse())
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eod) == (257, 256)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_gpt2_bpe_gives_the_reference_gpt2_encoder_tokens(files, text):
    tokenizer = build_tokenizer(
        parse(
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            str(files["vocab"]),
            "--merge-file",
            str(files["merges"]),
        )
    )
    reference = ReferenceGPT2Encoder(files["vocab"], files["merges"])
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and ids.tolist() == reference.encode(text)
    assert tokenizer.decode(ids) == text


def test_gpt2_bpe_eod_is_endoftext_and_vocab_is_the_vocab_file(files):
    tokenizer = GPT2BPETokenizer(str(files["vocab"]), str(files["merges"]))
    vocab = json.loads(files["vocab"].read_text())
    assert tokenizer.eod == vocab["<|endoftext|>"]
    assert tokenizer.vocab_size == len(vocab)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_hugging_face_tokenizer_gives_the_tokenizers_library_tokens(files, text):
    from tokenizers import Tokenizer

    tokenizer = build_tokenizer(
        parse(
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(files["tokenizer_json"]),
        )
    )
    direct = Tokenizer.from_file(str(files["tokenizer_json"])).encode(text).ids
    assert tokenizer.encode(text).tolist() == direct
    assert direct[0] == tokenizer._backend.token_to_id("<s>")  # the post-processor's BOS applies


def test_hugging_face_eod_is_the_eos_token_of_tokenizer_config(files):
    tokenizer = HuggingFaceTokenizer(str(files["tokenizer_json"]))
    assert tokenizer.eod == tokenizer._backend.token_to_id("</s>")
    assert tokenizer.vocab_size == 420


def test_hugging_face_tokenizer_accepts_its_folder(files):
    tokenizer = HuggingFaceTokenizer(str(files["tokenizer_json"].parent))
    assert (
        tokenizer.encode("fox").tolist()
        == HuggingFaceTokenizer(str(files["tokenizer_json"])).encode("fox").tolist()
    )


def test_hugging_face_eod_without_config_is_a_known_end_of_text_token(files, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(files["tokenizer_json"].read_bytes())
    tokenizer = HuggingFaceTokenizer(str(tmp_path / "tokenizer.json"))
    assert tokenizer.eod == tokenizer._backend.token_to_id("<|endoftext|>")


def test_hugging_face_eos_missing_from_the_vocabulary_is_an_error(files, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(files["tokenizer_json"].read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(
        TokenizerError,
        match=r"tokenizer\.json: cannot tell the end-of-document"
        r" token: found none of <\|eot\|>",
    ):
        HuggingFaceTokenizer(str(tmp_path / "tokenizer.json"))


def test_null_tokenizer_reads_ids_and_adds_eod_after_the_vocabulary_like_megatron():
    tokenizer = build_tokenizer(parse("--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"))
    assert tokenizer.encode(" 17 4\n999  0 ").tolist() == [17, 4, 999, 0]
    assert (tokenizer.vocab_size, tokenizer.eod) == (1001, 1000)
    assert tokenizer.decode([17, 4]) == "17 4"


def test_null_tokenizer_rejects_ids_outside_the_vocabulary():
    with pytest.raises(TokenizerError, match="id 1001 is outside 0..1000"):
        NullTokenizer(1000).encode("1 1001")
    with pytest.raises(TokenizerError, match="whitespace-separated integer ids"):
        NullTokenizer(1000).encode("1 two")


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--tokenizer-type", "GPT2BPETokenizer"), "needs --vocab-file"),
        (("--tokenizer-type", "HuggingFaceTokenizer"), "needs --tokenizer-model"),
        (("--tokenizer-type", "NullTokenizer"), "needs --vocab-size"),
    ],
)
def test_a_missing_flag_names_it(flags, message):
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer(parse(*flags))


def test_a_missing_tokenizer_file_is_file_not_found_naming_it(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"--tokenizer-model .*nope\.json"):
        build_tokenizer(
            parse("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", missing)
        )


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a Hugging Face tokenizer"):
        HuggingFaceTokenizer(str(bad))
