"""Megatron-LM's indexed dataset: token ids in `PREFIX.bin`, their layout in `PREFIX.idx`.

Byte-compatible with `megatron.core.datasets.indexed_dataset`, so data preprocessed for Megatron-LM
reads here unchanged and files written here read there. The `.idx` file, little-endian:

    b"MMIDIDX\\x00\\x00"             9 bytes, magic
    version                        u64, always 1
    dtype code                     u8, see DTYPE_OF_CODE
    sequence count S               u64
    document count D               u64, number of documents + 1
    sequence lengths               int32[S], tokens per sequence
    sequence pointers              int64[S], byte offset of each sequence in the .bin
    document indices               int64[D], first sequence of each document; starts with 0,
                                   ends with S

The `.bin` file is the sequences' tokens back to back in that dtype. A sequence is one
document's text under one JSON key (Megatron's preprocessing can also split documents into
sentences, one sequence each; GPT training treats every sequence as a unit either way).
"""

from __future__ import annotations

import array
import os
import struct

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_LEGACY_HEADER = b"TNTIDX\x00\x00"  # Megatron's pre-2020 lazy/cached format
_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8

DTYPE_OF_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_OF_CODE.items()}


class IndexedDatasetError(ValueError):
    """A file that is not a valid indexed dataset, or data that does not fit what was asked."""


class IndexedDatasetNotFoundError(IndexedDatasetError, FileNotFoundError):
    """The `.idx` or `.bin` half of an indexed dataset does not exist."""


def dataset_prefix(path: str | os.PathLike) -> str:
    """The prefix of an indexed dataset, accepting `PREFIX`, `PREFIX.bin` or `PREFIX.idx`."""
    path = os.fspath(path)
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id of the vocabulary fits it (as Megatron's preprocessing), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def _describe_codes() -> str:
    return ", ".join(f"{code} ({dtype.name})" for code, dtype in DTYPE_OF_CODE.items())


class IndexedDataset:
    """Memory-mapped reader of `PREFIX.idx` / `PREFIX.bin`.

    Raises IndexedDatasetNotFoundError when a file is missing and IndexedDatasetError when a file
    is truncated, has a wrong header or version, an unknown dtype code, or the `.idx` and `.bin`
    disagree; every message names the file, what was found and what was expected.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = dataset_prefix(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetNotFoundError(
                    f"indexed dataset {self.prefix!r}: {path} does not exist (a dataset is a pair "
                    f"{self.prefix}.idx + {self.prefix}.bin, as written by preprocess_data.py; "
                    "--data-path takes the prefix without the extension)"
                )
        self.dtype, num_sequences, num_documents = self._read_header()
        self.sequence_lengths, self.sequence_pointers, self.document_indices = self._map_index(
            num_sequences, num_documents
        )
        self._check_document_indices()
        self._bin = self._map_data()
        self._tokens = np.frombuffer(
            self._bin, dtype=self.dtype, count=len(self._bin) // self.dtype.itemsize
        )

    # -- reading the two files -----------------------------------------------------------------

    def _read_header(self) -> tuple[np.dtype, int, int]:
        with open(self.idx_path, "rb") as f:
            header = f.read(_HEADER_BYTES)
        if header.startswith(_LEGACY_HEADER):
            raise IndexedDatasetError(
                f"{self.idx_path} is in Megatron's legacy 'TNTIDX' (lazy/cached) format; expected "
                f"the memory-mapped format that starts with {INDEX_HEADER!r}. Convert it with a "
                "current Megatron-LM or preprocess the data again"
            )
        if len(header) < _HEADER_BYTES:
            raise IndexedDatasetError(
                f"{self.idx_path} is {len(header)} bytes, too short for the {_HEADER_BYTES}-byte "
                "header of an index file: the file is truncated"
            )
        magic = header[: len(INDEX_HEADER)]
        if magic != INDEX_HEADER:
            raise IndexedDatasetError(
                f"{self.idx_path} starts with {magic!r}; expected the index header "
                f"{INDEX_HEADER!r}: this is not a Megatron .idx file"
            )
        version, code, num_sequences, num_documents = struct.unpack_from(
            "<QBQQ", header, len(INDEX_HEADER)
        )
        if version != INDEX_VERSION:
            raise IndexedDatasetError(
                f"{self.idx_path} has index version {version}; expected {INDEX_VERSION}"
            )
        if code not in DTYPE_OF_CODE:
            raise IndexedDatasetError(
                f"{self.idx_path} has dtype code {code}; expected one of {_describe_codes()}"
            )
        return DTYPE_OF_CODE[code].newbyteorder("<"), num_sequences, num_documents

    def _map_index(self, num_sequences: int, num_documents: int):
        needed = _HEADER_BYTES + 12 * num_sequences + 8 * num_documents
        size = os.path.getsize(self.idx_path)
        # Megatron's multimodal datasets append one int8 mode per sequence; those bytes are ignored.
        if size not in (needed, needed + num_sequences):
            problem = "the file is truncated" if size < needed else "it has trailing bytes"
            raise IndexedDatasetError(
                f"{self.idx_path} is {size} bytes; its header announces {num_sequences} sequences "
                f"and {num_documents} document indices, which take {needed} bytes: {problem}"
            )
        offset = _HEADER_BYTES

        def take(dtype: str, count: int) -> np.ndarray:
            nonlocal offset
            if count == 0:
                return np.empty(0, dtype=dtype)
            view = np.memmap(self.idx_path, dtype=dtype, mode="r", offset=offset, shape=(count,))
            offset += view.nbytes
            return view

        return take("<i4", num_sequences), take("<i8", num_sequences), take("<i8", num_documents)

    def _check_document_indices(self) -> None:
        docs, count = self.document_indices, len(self.sequence_lengths)
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != count:
            found = f"[{docs[0]}, ..., {docs[-1]}]" if len(docs) else "no entries"
            raise IndexedDatasetError(
                f"{self.idx_path}: document indices are {found}; expected them to start at 0 "
                f"and end at the sequence count {count}"
            )

    def _map_data(self) -> np.ndarray:
        size = os.path.getsize(self.bin_path)
        if len(self.sequence_lengths):
            needed = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * (
                self.dtype.itemsize
            )
        else:
            needed = 0
        if size != needed:
            problem = (
                "the .bin is truncated" if size < needed else "the files do not belong together"
            )
            raise IndexedDatasetError(
                f"{self.bin_path} is {size} bytes but {self.idx_path} describes {needed} bytes "
                f"({len(self.sequence_lengths)} sequences of {self.dtype.name}): {problem}"
            )
        if size == 0:
            return np.empty(0, dtype=np.uint8)
        return np.memmap(self.bin_path, dtype=np.uint8, mode="r")

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset .. offset + length` of sequence `index` (to its end when length is
        None), a read-only view into the memory-mapped `.bin`."""
        if length is None:
            length = int(self.sequence_lengths[index]) - offset
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def gather(
        self, sequences: np.ndarray, begins: np.ndarray, ends: np.ndarray, out: np.ndarray
    ) -> None:
        """Fill `out` with tokens begins[k] .. ends[k] - 1 of sequence sequences[k], for all k
        in order (one vectorized read, however many pieces)."""
        lengths = ends - begins
        pointers = self.sequence_pointers[sequences]
        if self.dtype.itemsize > 1 and (pointers % self.dtype.itemsize).any():
            raise IndexedDatasetError(
                f"{self.idx_path}: a pointer of sequences {sequences.tolist()} is not a multiple "
                f"of the {self.dtype.itemsize}-byte {self.dtype.name}; the index is corrupt"
            )
        starts = pointers // self.dtype.itemsize + begins
        positions = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        positions += np.arange(len(out))
        out[:] = self._tokens[positions]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def document(self, index: int) -> np.ndarray:
        """All tokens of document `index` (its sequences concatenated)."""
        first, last = int(self.document_indices[index]), int(self.document_indices[index + 1])
        if first == last:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate([self.get(i) for i in range(first, last)])


class IndexedDatasetWriter:
    """Writes `PREFIX.bin` and `PREFIX.idx` in Megatron's format.

        with IndexedDatasetWriter("out/corpus_text_document", np.uint16) as writer:
            writer.add_document(tokens)              # one sequence, then a document boundary
            writer.add_document(tokens, lengths)     # several sequences (sentences), one document

    Both files appear only when writing finished (they are written under temporary names and
    renamed), so an interrupted run never leaves a pair that looks complete.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = dataset_prefix(prefix)
        native = np.dtype(np.dtype(dtype).name)
        if native not in CODE_OF_DTYPE:
            raise IndexedDatasetError(
                f"cannot write {self.prefix}.bin as {native.name}; the format has dtype codes "
                f"{_describe_codes()}"
            )
        self._code = CODE_OF_DTYPE[native]
        self.dtype = native.newbyteorder("<")
        self._integer = self.dtype.kind in "iu"
        self._lengths = array.array("i")
        self._document_indices = array.array("q", [0])
        self._bin_tmp = f"{self.prefix}.bin.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")

    def add_sequence(self, tokens) -> None:
        """Append one sequence (Megatron's `add_item`)."""
        tokens = np.asarray(tokens)
        if (
            self._integer
            and tokens.size
            and (tokens.min() < np.iinfo(self.dtype).min or tokens.max() > np.iinfo(self.dtype).max)
        ):
            raise IndexedDatasetError(
                f"{self.prefix}.bin stores {self.dtype.name}, which holds "
                f"{np.iinfo(self.dtype).min}..{np.iinfo(self.dtype).max}; got token ids "
                f"{tokens.min()}..{tokens.max()}: write with a wider dtype"
            )
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(tokens.size)

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last boundary form it."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths=None) -> None:
        """Append one document: `tokens` as one sequence, or split into sequences of `lengths`
        (an empty list: a document without sequences, as Megatron writes an empty one)."""
        tokens = np.asarray(tokens)
        lengths = [tokens.size] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != tokens.size:
            raise ValueError(
                f"sequence lengths sum to {sum(lengths)}, but the document has {tokens.size} tokens"
            )
        start = 0
        for length in lengths:
            self.add_sequence(tokens[start : start + length])
            start += length
        self.end_document()

    def finalize(self) -> None:
        """Write the `.idx` and move both files to their final names."""
        self._bin.close()
        lengths = (
            np.frombuffer(self._lengths, dtype=np.int32)
            if self._lengths
            else np.empty(0, dtype=np.int32)
        )
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        documents = np.frombuffer(self._document_indices, dtype=np.int64)
        idx_tmp = f"{self.prefix}.idx.tmp{os.getpid()}"
        with open(idx_tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<QBQQ", INDEX_VERSION, self._code, len(lengths), len(documents)))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(documents.astype("<i8").tobytes())
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        """Drop everything written so far."""
        self._bin.close()
        if os.path.exists(self._bin_tmp):
            os.remove(self._bin_tmp)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
