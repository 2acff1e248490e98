"""The embedded default corpus: Python's own help topics (`pydoc_data.topics`), which ship with
every CPython, so the default run trains offline on real English prose and code (~466 KB).

Documents (one per help topic, sorted by name) are byte-tokenized and joined with EOD tokens;
every `VALIDATION_EVERY`-th document is held out for validation.
"""

from __future__ import annotations

import numpy as np

from megatron_hybrid.data.tokenizer import ByteTokenizer

VALIDATION_EVERY = 20


def embedded_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def embedded_token_streams(tokenizer: ByteTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, validation tokens), each a flat int64 array of EOD-separated documents."""
    train, valid = [], []
    for i, doc in enumerate(embedded_documents()):
        tokens = np.append(tokenizer.encode(doc), tokenizer.eod)
        (valid if i % VALIDATION_EVERY == VALIDATION_EVERY // 2 else train).append(tokens)
    return np.concatenate(train), np.concatenate(valid)
