"""Megatron's indexed dataset format: reader, writer, and their errors.

`write_by_layout` below is an independent writer: it produces the byte layout of Megatron-LM's
`.idx`/`.bin` pair with `struct` and raw bytes, without the framework's code.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from megatron_hybrid.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    token_dtype_for_vocab,
)

CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


def write_by_layout(prefix, documents: list[list[np.ndarray]], dtype) -> None:
    """documents: per document, its sequences."""
    dtype = np.dtype(dtype)
    sequences = [s for doc in documents for s in doc]
    lengths = [len(s) for s in sequences]
    pointers, offset = [], 0
    for n in lengths:
        pointers.append(offset)
        offset += n * dtype.itemsize
    doc_indices = [0]
    for doc in documents:
        doc_indices.append(doc_indices[-1] + len(doc))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype.type]))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_indices)}q", *doc_indices))
    with open(f"{prefix}.bin", "wb") as f:
        for s in sequences:
            f.write(s.astype(dtype.newbyteorder("<")).tobytes())


def random_documents(dtype, seed=0) -> list[list[np.ndarray]]:
    """Five documents of 1-3 sequences (one document empty), values spread over the dtype."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        draw = lambda n: rng.standard_normal(n).astype(dtype) * 1e3  # noqa: E731
    else:
        info = np.iinfo(dtype)
        draw = lambda n: rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype)  # noqa: E731
    docs = [
        [draw(int(rng.integers(1, 40))) for _ in range(int(rng.integers(1, 4)))] for _ in range(5)
    ]
    docs[2] = []
    return docs


def write_with_writer(prefix, documents, dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            if doc:
                writer.add_document(np.concatenate(doc), [len(s) for s in doc])
            else:
                writer.end_document()


def assert_reads_back(dataset: IndexedDataset, documents) -> None:
    sequences = [s for doc in documents for s in doc]
    assert len(dataset) == len(sequences)
    assert dataset.num_documents == len(documents)
    for i, s in enumerate(sequences):
        assert dataset[i].dtype == s.dtype
        np.testing.assert_array_equal(dataset[i], s)
    for d, doc in enumerate(documents):
        expected = np.concatenate(doc) if doc else np.empty(0, dtype=dataset.dtype)
        np.testing.assert_array_equal(dataset.document(d), expected)


@pytest.mark.parametrize("dtype", list(CODES), ids=lambda t: np.dtype(t).name)
def test_writer_then_reader_round_trips_every_dtype(tmp_path, dtype):
    docs = random_documents(dtype)
    write_with_writer(tmp_path / "data", docs, dtype)
    assert_reads_back(IndexedDataset(tmp_path / "data"), docs)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32], ids=lambda t: t.__name__)
def test_reader_reads_files_written_from_the_byte_layout(tmp_path, dtype):
    docs = random_documents(dtype, seed=1)
    write_by_layout(tmp_path / "data", docs, dtype)
    assert_reads_back(IndexedDataset(tmp_path / "data"), docs)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64], ids=lambda t: t.__name__)
def test_writer_output_is_byte_identical_to_the_layout(tmp_path, dtype):
    docs = random_documents(dtype, seed=2)
    write_by_layout(tmp_path / "reference", docs, dtype)
    write_with_writer(tmp_path / "ours", docs, dtype)
    for suffix in (".idx", ".bin"):
        ours = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours == (tmp_path / f"reference{suffix}").read_bytes(), suffix


def test_get_reads_a_window_of_a_sequence(tmp_path):
    tokens = np.arange(100, 160, dtype=np.int32)
    write_by_layout(tmp_path / "data", [[tokens[:10]], [tokens[10:]]], np.int32)
    dataset = IndexedDataset(tmp_path / "data")
    np.testing.assert_array_equal(dataset.get(1, offset=5, length=7), tokens[15:22])
    np.testing.assert_array_equal(dataset.get(1, offset=45), tokens[55:])


def test_prefix_may_be_given_with_its_extension(tmp_path):
    write_by_layout(tmp_path / "data", [[np.array([3, 1, 4], np.uint16)]], np.uint16)
    assert IndexedDataset(f"{tmp_path}/data.bin").prefix == f"{tmp_path}/data"


def test_vocabularies_up_to_65536_are_stored_as_uint16():
    assert token_dtype_for_vocab(257) == np.uint16
    assert token_dtype_for_vocab(65536) == np.uint16
    assert token_dtype_for_vocab(65537) == np.int32


def test_writer_refuses_ids_the_dtype_cannot_hold(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "data", np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"uint16.*0\.\.65535.*70000"):
        writer.add_document(np.array([5, 70000]))
    writer.abort()


def test_an_interrupted_writer_leaves_no_dataset(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "data", np.uint16) as writer:
            writer.add_document(np.array([1, 2, 3]))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# -- bad files ------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    """A valid uint16 dataset of two documents; returns its prefix."""
    write_by_layout(
        tmp_path / "data",
        [[np.arange(1, 11, dtype=np.uint16)], [np.arange(20, 25, dtype=np.uint16)]],
        np.uint16,
    )
    return tmp_path / "data"


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_a_missing_file_is_file_not_found_naming_it(good, missing):
    (good.parent / f"data{missing}").unlink()
    with pytest.raises(FileNotFoundError, match=rf"data\{missing} does not exist") as error:
        IndexedDataset(good)
    assert isinstance(error.value, ValueError)  # the CLI reports it as a user error


def test_a_wrong_header_is_named(good):
    idx = good.parent / "data.idx"
    idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    with pytest.raises(IndexedDatasetError, match=r"data\.idx starts with b'NOTANIDX!'.*MMIDIDX"):
        IndexedDataset(good)


def test_the_legacy_format_is_named(good):
    idx = good.parent / "data.idx"
    idx.write_bytes(b"TNTIDX\x00\x00" + idx.read_bytes()[8:])
    with pytest.raises(IndexedDatasetError, match="legacy 'TNTIDX'"):
        IndexedDataset(good)


def test_an_unknown_version_is_named(good):
    idx = good.parent / "data.idx"
    data = bytearray(idx.read_bytes())
    data[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(data))
    with pytest.raises(IndexedDatasetError, match="index version 2; expected 1"):
        IndexedDataset(good)


def test_an_unknown_dtype_code_is_named(good):
    idx = good.parent / "data.idx"
    data = bytearray(idx.read_bytes())
    data[17] = 9
    idx.write_bytes(bytes(data))
    with pytest.raises(IndexedDatasetError, match=r"dtype code 9; expected one of 1 \(uint8\)"):
        IndexedDataset(good)


@pytest.mark.parametrize("keep", [20, 60])
def test_a_truncated_idx_is_named(good, keep):
    idx = good.parent / "data.idx"
    idx.write_bytes(idx.read_bytes()[:keep])
    with pytest.raises(IndexedDatasetError, match=r"data\.idx is \d+ bytes.*truncated"):
        IndexedDataset(good)


def test_a_truncated_bin_is_named(good):
    bin_path = good.parent / "data.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(
        IndexedDatasetError,
        match=r"data\.bin is 26 bytes but .*data\.idx "
        r"describes 30 bytes.*truncated",
    ):
        IndexedDataset(good)


def test_a_bin_of_another_dataset_is_named(good):
    bin_path = good.parent / "data.bin"
    bin_path.write_bytes(bin_path.read_bytes() * 2)
    with pytest.raises(IndexedDatasetError, match="do not belong together"):
        IndexedDataset(good)
