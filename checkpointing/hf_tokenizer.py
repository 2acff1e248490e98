"""The tokenizer of a Hugging Face export: `tokenizer.json` and `tokenizer_config.json` beside the
weights, so `AutoTokenizer.from_pretrained(DIR)` gives the ids the model was trained on.

ByteTokenizer becomes a byte-level BPE without merges (each byte one token, id = byte value, EOD
`<|endoftext|>` = 256); HuggingFaceTokenizer and GPT2BPETokenizer write their own
`tokenizers.Tokenizer` (and keep a HuggingFaceTokenizer's tokenizer_config.json: its chat
template and special tokens); NullTokenizer has no text form and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_hybrid.data.tokenizer import (
    ByteTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    Tokenizer,
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
BYTE_EOD_TOKEN = "<|endoftext|>"


def write_hf_tokenizer(tokenizer: Tokenizer, directory: Path, max_length: int | None) -> str:
    """Write `tokenizer` for transformers into `directory`; returns one line for the log."""
    if isinstance(tokenizer, ByteTokenizer):
        backend, eos = byte_level_backend(), BYTE_EOD_TOKEN
    elif isinstance(tokenizer, (HuggingFaceTokenizer, GPT2BPETokenizer)):
        backend = tokenizer._backend
        eos = backend.id_to_token(tokenizer.eod)
    else:
        return f"{tokenizer.name} has no text form: no tokenizer written (ids only)"
    backend.save(str(directory / TOKENIZER_FILE))
    # A HuggingFaceTokenizer's own config is kept (chat template, special tokens); what
    # AutoTokenizer needs and it may lack is filled in.
    source_config = _source_config(tokenizer)
    config = json.loads(source_config.read_text()) if source_config is not None else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("eos_token", eos)
    if max_length:
        config.setdefault("model_max_length", max_length)
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return f"wrote {TOKENIZER_FILE} ({tokenizer.name}, end of document {eos!r})"


def _source_config(tokenizer: Tokenizer) -> Path | None:
    if isinstance(tokenizer, HuggingFaceTokenizer):
        config = Path(tokenizer.path).parent / TOKENIZER_CONFIG_FILE
        return config if config.is_file() else None
    return None


def byte_level_backend():
    """ByteTokenizer as a `tokenizers.Tokenizer`: GPT-2's byte-to-character map with no merges,
    so every byte is its own token and its id is the byte's value."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    characters = _gpt2_byte_characters()
    vocab = {characters[byte]: byte for byte in range(256)}
    vocab[BYTE_EOD_TOKEN] = ByteTokenizer.eod
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BYTE_EOD_TOKEN])
    return backend


def _gpt2_byte_characters() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping
