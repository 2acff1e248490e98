"""Tokenizers, all offline, behind one small interface:

    tokenizer.vocab_size    number of token ids (the model pads it to a multiple of
                            --make-vocab-size-divisible-by)
    tokenizer.eod           the end-of-document id that separates documents in the token stream
    tokenizer.encode(text)  -> np.ndarray of int64 ids
    tokenizer.decode(ids)   -> str

`--tokenizer-type` picks one, with Megatron-LM's names where Megatron has the tokenizer:

    ByteTokenizer           (default) token i < 256 is byte i, 256 is EOD; needs no file
    HuggingFaceTokenizer    a Hugging Face `tokenizer.json` (--tokenizer-model FILE or a folder
                            holding it), run with the `tokenizers` library, no network
    GPT2BPETokenizer        GPT-2 byte-level BPE from --vocab-file vocab.json and
                            --merge-file merges.txt
    NullTokenizer           already-tokenized text (whitespace-separated ids), --vocab-size N;
                            as in Megatron, vocab_size is N + 1 and eod is N
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

TOKENIZER_TYPES = ("ByteTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer")

# End-of-document candidates, in order, for a tokenizer.json without a tokenizer_config.json.
_KNOWN_EOS_TOKENS = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eot_id|>",
    "<|im_end|>",
    "[SEP]",
)


class TokenizerError(ValueError):
    """Tokenizer flags or files that cannot give a tokenizer."""


class TokenizerFileNotFoundError(TokenizerError, FileNotFoundError):
    """A tokenizer file named by a flag does not exist."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eod: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, tokens) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer: token i < 256 is byte i, token 256 is end-of-document (EOD)."""

    name = "ByteTokenizer"
    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, tokens) -> str:
        """Bytes back to text; EOD becomes a newline, ids beyond a byte (padding rows of the
        vocabulary that an untrained model may sample) are dropped, and invalid UTF-8 is
        replaced rather than raised, since samples from a model may split characters."""
        data = bytearray()
        for t in (int(t) for t in tokens):
            if t < 256:
                data.append(t)
            elif t == self.eod:
                data.extend(b"\n")
        return data.decode("utf-8", errors="replace")


class _TokenizersLibraryTokenizer:
    """Shared encode/decode over a `tokenizers.Tokenizer`."""

    name: str
    vocab_size: int
    eod: int

    def __init__(self, backend):
        self._backend = backend

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._backend.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._backend.encode_batch(texts)]

    def decode(self, tokens) -> str:
        """Ids outside the vocabulary (padding rows a model may sample) are dropped."""
        ids = [int(t) for t in tokens if 0 <= int(t) < self.vocab_size]
        return self._backend.decode(ids, skip_special_tokens=False)


def _require_file(path: str | None, flag: str, tokenizer_type: str) -> str:
    if not path:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.isfile(path):
        raise TokenizerFileNotFoundError(f"{flag} {path}: no such file")
    return path


class HuggingFaceTokenizer(_TokenizersLibraryTokenizer):
    """A Hugging Face fast tokenizer loaded from a local `tokenizer.json` (or a folder with one).

    Encoding applies the tokenizer's post-processor (a Llama-style BOS, for instance), as
    Megatron's HuggingFaceTokenizer does. The EOD id is the `eos_token` of a
    `tokenizer_config.json` next to the file, else the first known end-of-text token found in the
    vocabulary (<|endoftext|>, <|end_of_text|>, </s>, ...).
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as Backend

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        _require_file(path, "--tokenizer-model", "HuggingFaceTokenizer")
        try:
            backend = Backend.from_file(path)
        except Exception as error:  # the library raises its own Exception type
            raise TokenizerError(
                f"--tokenizer-model {path}: not a Hugging Face tokenizer.json ({error})"
            ) from error
        super().__init__(backend)
        self.path = path  # the tokenizer.json
        self.name = f"HuggingFaceTokenizer({path})"
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod(path)

    def _find_eod(self, path: str) -> int:
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        candidates = list(_KNOWN_EOS_TOKENS)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                candidates = [eos]
        for token in candidates:
            if (token_id := self._backend.token_to_id(token)) is not None:
                return token_id
        raise TokenizerError(
            f"--tokenizer-model {path}: cannot tell the end-of-document token: found none of "
            f"{', '.join(candidates)} in its vocabulary; put a tokenizer_config.json with "
            '"eos_token" next to it'
        )


class GPT2BPETokenizer(_TokenizersLibraryTokenizer):
    """GPT-2's byte-level BPE from `vocab.json` + `merges.txt`; EOD is `<|endoftext|>`.

    Same tokens as OpenAI's encoder and Megatron's GPT2BPETokenizer: GPT-2's pre-tokenization
    regex, no prefix space, and `<|endoftext|>` inside text is plain text, not a special token.
    """

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers

        _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer")
        _require_file(merge_file, "--merge-file", "GPT2BPETokenizer")
        try:
            backend = Backend(models.BPE.from_file(vocab_file, merge_file))
        except Exception as error:
            raise TokenizerError(
                f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a "
                f"GPT-2 vocab.json and merges.txt ({error})"
            ) from error
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        super().__init__(backend)
        self.name = f"GPT2BPETokenizer({vocab_file})"
        self.vocab_size = backend.get_vocab_size()
        eod = backend.token_to_id("<|endoftext|>")
        if eod is None:
            raise TokenizerError(
                f"--vocab-file {vocab_file} has no '<|endoftext|>' token, which "
                "GPT2BPETokenizer uses as end of document"
            )
        self.eod = eod


class NullTokenizer:
    """Text that is already token ids, separated by whitespace (Megatron's NullTokenizer):
    `--vocab-size N` gives ids 0..N-1 plus the EOD id N, so vocab_size is N + 1."""

    def __init__(self, vocab_size: int | None):
        if vocab_size is None or vocab_size < 1:
            raise TokenizerError(
                f"--tokenizer-type NullTokenizer needs --vocab-size N >= 1, got {vocab_size}"
            )
        self.name = f"NullTokenizer({vocab_size})"
        self.vocab_size = vocab_size + 1
        self.eod = vocab_size

    def encode(self, text: str) -> np.ndarray:
        try:
            ids = np.array([int(word) for word in text.split()], dtype=np.int64)
        except ValueError as error:
            raise TokenizerError(
                f"NullTokenizer reads whitespace-separated integer ids; {error}"
            ) from error
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise TokenizerError(
                f"NullTokenizer: id {bad} is outside 0..{self.vocab_size - 1} "
                f"(--vocab-size {self.eod} plus EOD {self.eod})"
            )
        return ids

    def decode(self, tokens) -> str:
        return " ".join(str(int(t)) for t in tokens)


@dataclass
class TokenizerSettings:
    """Which tokenizer, and its files (the tokenizer flags of training and preprocessing)."""

    tokenizer_type: str = "ByteTokenizer"
    """One of TOKENIZER_TYPES; each reads only its own file or size field (TOKENIZER_FLAGS)."""
    tokenizer_model: str | None = None
    """HuggingFaceTokenizer: a tokenizer.json, or a folder holding one."""
    vocab_file: str | None = None
    """GPT2BPETokenizer: GPT-2's vocab.json."""
    merge_file: str | None = None
    """GPT2BPETokenizer: GPT-2's merges.txt."""
    vocab_size: int | None = None
    """NullTokenizer: ids are 0..N-1, EOD is N."""


_DEFAULTS = TokenizerSettings()


def add_tokenizer_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The tokenizer flags, shared by training and preprocessing (defaults from
    TokenizerSettings)."""
    parser.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        default=_DEFAULTS.tokenizer_type,
        help="ByteTokenizer needs no file; HuggingFaceTokenizer needs "
        "--tokenizer-model; GPT2BPETokenizer --vocab-file and --merge-file; "
        "NullTokenizer --vocab-size",
    )
    parser.add_argument(
        "--tokenizer-model",
        default=_DEFAULTS.tokenizer_model,
        help="a Hugging Face tokenizer.json, or a folder holding one",
    )
    parser.add_argument("--vocab-file", default=_DEFAULTS.vocab_file, help="GPT-2 vocab.json")
    parser.add_argument("--merge-file", default=_DEFAULTS.merge_file, help="GPT-2 merges.txt")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=_DEFAULTS.vocab_size,
        help="NullTokenizer: ids are 0..N-1, EOD is N",
    )


def build_tokenizer(settings: TokenizerSettings) -> Tokenizer:
    """The tokenizer `settings` describe; raises TokenizerError (a ValueError) for missing or
    unreadable files and missing flags. (Parsed tokenizer flags, as preprocessing passes them,
    have the same fields.)"""
    kind = settings.tokenizer_type
    _refuse_other_tokenizers_flags(settings, kind)
    if kind == "ByteTokenizer":
        return ByteTokenizer()
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_require_file_or_dir(settings.tokenizer_model))
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(settings.vocab_file, settings.merge_file)
    if kind == "NullTokenizer":
        return NullTokenizer(settings.vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {kind!r} is unknown; expected one of {', '.join(TOKENIZER_TYPES)}"
    )


# The file and size flags each tokenizer type reads; a flag of another type would be ignored.
TOKENIZER_FLAGS = {
    "ByteTokenizer": (),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "NullTokenizer": ("vocab_size",),
}


def _refuse_other_tokenizers_flags(settings: TokenizerSettings, kind: str) -> None:
    for other, flags in TOKENIZER_FLAGS.items():
        for flag in flags:
            if other != kind and getattr(settings, flag) is not None:
                used = ", ".join("--" + f.replace("_", "-") for f in TOKENIZER_FLAGS.get(kind, ()))
                raise TokenizerError(
                    f"--{flag.replace('_', '-')} belongs to --tokenizer-type {other}; "
                    f"--tokenizer-type {kind} would ignore it "
                    f"({'it reads ' + used if used else 'it needs no file or size flag'}): "
                    "drop it or change --tokenizer-type"
                )


def _require_file_or_dir(path: str | None) -> str:
    if not path:
        raise TokenizerError(
            "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model "
            "(a tokenizer.json or a folder holding one)"
        )
    if not os.path.exists(path):
        raise TokenizerFileNotFoundError(f"--tokenizer-model {path}: no such file or folder")
    return path


# -- the tokenizer a checkpoint records ---------------------------------------------------------
# Under which name each tokenizer file is copied into a checkpoint directory: the names the
# tokenizers look for (HuggingFaceTokenizer finds tokenizer_config.json next to tokenizer.json).
_RECORDED_FILES = {
    "tokenizer_model": "tokenizer.json",
    "vocab_file": "vocab.json",
    "merge_file": "merges.txt",
}
_HF_CONFIG_FILE = "tokenizer_config.json"


def tokenizer_record(settings: TokenizerSettings) -> tuple[dict, dict[str, str]]:
    """What a checkpoint records of the tokenizer it was trained with: (the JSON record, the
    files to copy into the checkpoint directory as {name there: source path}). The record holds
    TokenizerSettings' fields with file paths relative to the checkpoint directory, so a
    checkpoint moved elsewhere still finds them (`recorded_tokenizer_settings` reads it back)."""
    record = {"tokenizer_type": settings.tokenizer_type, "vocab_size": settings.vocab_size}
    copies = {}
    for field_name in TOKENIZER_FLAGS[settings.tokenizer_type]:
        if field_name not in _RECORDED_FILES:
            continue
        source = getattr(settings, field_name)
        if field_name == "tokenizer_model" and os.path.isdir(source):
            source = os.path.join(source, "tokenizer.json")
        name = _RECORDED_FILES[field_name]
        record[field_name], copies[name] = name, source
        if field_name == "tokenizer_model":  # the EOD token may come from its config
            config_file = os.path.join(os.path.dirname(source), _HF_CONFIG_FILE)
            if os.path.isfile(config_file):
                copies[_HF_CONFIG_FILE] = config_file
    return record, copies


def recorded_tokenizer_settings(record, directory: str | os.PathLike) -> TokenizerSettings:
    """The TokenizerSettings of a checkpoint's tokenizer record (`tokenizer_record`), its files
    in `directory`. Raises TokenizerError when the record is not one this version writes."""
    fields = set(TokenizerSettings.__dataclass_fields__)
    if (
        not isinstance(record, dict)
        or record.get("tokenizer_type") not in TOKENIZER_TYPES
        or not set(record) <= fields
    ):
        raise TokenizerError(
            f"{directory}: the checkpoint's tokenizer record {json.dumps(record)[:200]} is not "
            f"one this version reads (a tokenizer_type of {', '.join(TOKENIZER_TYPES)} and the "
            f"fields {', '.join(sorted(fields))}); name the tokenizer with --tokenizer-type and "
            "its file flags"
        )
    settings = TokenizerSettings(**record)
    for field_name in _RECORDED_FILES:
        if getattr(settings, field_name) is not None:
            setattr(settings, field_name, os.path.join(directory, getattr(settings, field_name)))
    return settings
