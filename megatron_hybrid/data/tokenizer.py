"""Byte-level tokenizer: token i < 256 is byte i, token 256 is end-of-document (EOD)."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
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
