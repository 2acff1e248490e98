"""Real tokenizer files built offline for the tests (never downloaded), and an independent
GPT-2 encoder to check the GPT-2 tokenizer against.

`write_tokenizer_files(folder)` trains a tiny byte-level BPE with the `tokenizers` library and
writes it in both formats the framework reads: a Hugging Face `tokenizer.json` (with a BOS
post-processor and a tokenizer_config.json naming the EOS) and a GPT-2 `vocab.json` +
`merges.txt`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune",
    "must be in want of a wife. We'll see; they've 3 cats and 42 dogs!",
    "Café au lait, naïve résumé: déjà vu.",
    "def main():\n    return 1_000 + x**2  # comment\n\n\n",
    "Hello   world\t\ttabs and    spaces   ",
]

SAMPLE_TEXTS = [
    "The lazy fox's résumé: 12 cats, 7 dogs!!",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n  indented_name = value_2  # ok?",
    "<|endoftext|> is plain text here",
    "unseen wordsz qqq ZZZ 9999",
]


def write_tokenizer_files(folder: Path) -> dict[str, Path]:
    """Train the tiny BPE and write {"tokenizer_json", "vocab", "merges"} under `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer)

    gpt2 = folder / "gpt2"
    gpt2.mkdir(parents=True)
    tokenizer.model.save(str(gpt2))  # vocab.json + merges.txt, GPT-2's layout

    hf = folder / "hf"
    hf.mkdir()
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return {
        "tokenizer_json": hf / "tokenizer.json",
        "vocab": gpt2 / "vocab.json",
        "merges": gpt2 / "merges.txt",
    }


# -- an independent GPT-2 encoder (OpenAI's algorithm, written from its description) ------------

# GPT-2's pre-tokenization pattern in Python's `re`: letters [^\W\d_], digits \d, other
# non-space symbols including "_". Equal to the original \p{L} / \p{N} classes on the texts above.
_GPT2_PATTERN = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+"""
    r"""|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


class ReferenceGPT2Encoder:
    def __init__(self, vocab_path: Path, merges_path: Path):
        self.encoder = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()

    def _bpe(self, word: tuple[str, ...]) -> tuple[str, ...]:
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _GPT2_PATTERN.findall(text):
            word = tuple(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self._bpe(word))
        return ids
