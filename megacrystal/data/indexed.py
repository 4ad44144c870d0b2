"""Megatron-core's indexed dataset format (`.bin` tokens + `.idx` index), written and read without torch.

The format (megatron/core/datasets/indexed_dataset.py, version 1): the idx holds the header `MMIDIDX\\0\\0`,
version <Q 1, dtype code <B, sequence count <Q, document count <Q, then int32 sequence lengths, int64 byte
pointers and int64 document indices. Writing it here keeps `megacrystal prepare` free of torch (megatron's
builder imports it); tests read our files back with megatron's own IndexedDataset.
"""
from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from megacrystal.data.errors import DataError

SPLITS = ("train", "valid")
_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
                np.uint16: 8}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype megatron picks for this vocabulary (uint16 below 65500, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def split_prefix(out_prefix: str | os.PathLike, split: str) -> str:
    """`<out_prefix>_<split>`: the megatron path prefix of one split."""
    return f"{out_prefix}_{split}"


def files(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """The `.idx` and `.bin` paths of a megatron path prefix."""
    return Path(f"{prefix}.idx"), Path(f"{prefix}.bin")


class DocumentWriter:
    """Appends documents (one sequence each) to an open `.bin` and keeps their lengths for the `.idx`."""

    def __init__(self, bin_file, dtype: type[np.number]):
        self._bin = bin_file
        self.dtype = dtype
        self.lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        """Write one document (already ending with EOS)."""
        self.add_many(np.asarray(tokens, dtype=self.dtype), np.array([len(tokens)], dtype=np.int32))

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Write consecutive documents given as one token array and their lengths."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)  # no copy into a bytes object
        self.lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(tokens.size)

    def write_index(self, path: Path) -> None:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        with path.open("wb") as fh:
            fh.write(_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[self.dtype]))
            fh.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
            fh.write(lengths.tobytes())
            fh.write(pointers.tobytes())
            fh.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def writer(prefix: str | os.PathLike, vocab_size: int) -> Iterator[DocumentWriter]:
    """Write `<prefix>.{bin,idx}` via temporary names renamed on success, so a crash leaves no half dataset."""
    idx, bin_ = files(prefix)
    tmp_idx, tmp_bin = idx.with_name(idx.name + ".tmp"), bin_.with_name(bin_.name + ".tmp")
    dtype = token_dtype(vocab_size)
    try:
        with tmp_bin.open("wb") as fh:
            w = DocumentWriter(fh, dtype)
            yield w
            fh.flush()
            os.fsync(fh.fileno())
        w.write_index(tmp_idx)
    except BaseException:
        for p in (tmp_idx, tmp_bin):
            p.unlink(missing_ok=True)
        raise
    os.replace(tmp_bin, bin_)
    os.replace(tmp_idx, idx)


def read_index(prefix: str | os.PathLike) -> tuple[np.dtype, np.ndarray]:
    """(dtype, sequence lengths) of `<prefix>.idx`, raising DataError naming a missing or broken file."""
    idx, bin_ = files(prefix)
    for path in (idx, bin_):
        if not path.is_file():
            raise DataError(f"dataset file {path} is missing; run `megacrystal prepare` to build it")
    raw = idx.read_bytes()
    fixed = len(_HEADER) + 8 + 1 + 8 + 8
    if len(raw) < fixed or not raw.startswith(_HEADER):
        raise DataError(f"dataset {idx} is unreadable (not a megatron index); re-run `megacrystal prepare`")
    code = raw[len(_HEADER) + 8]
    count = struct.unpack_from("<Q", raw, len(_HEADER) + 9)[0]
    if code not in _CODE_DTYPES or len(raw) < fixed + count * 12:
        raise DataError(f"dataset {idx} is unreadable (bad dtype or truncated); re-run `megacrystal prepare`")
    lengths = np.frombuffer(raw, dtype=np.int32, count=count, offset=fixed)
    return np.dtype(_CODE_DTYPES[code]), lengths


def open_dataset(prefix: str | os.PathLike):
    """Open `<prefix>.{bin,idx}` with megatron-core (imports torch), raising DataError naming a broken file."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    read_index(prefix)
    try:
        return IndexedDataset(str(prefix), mmap=True)
    except Exception as e:  # megatron asserts on a bad header; the user needs the file name, not the assert
        raise DataError(f"dataset {prefix}.idx is unreadable ({type(e).__name__}: {e}); "
                        f"re-run `megacrystal prepare` to rebuild it") from None


def count_tokens(dataset) -> int:
    """Total tokens over all sequences of an indexed dataset."""
    return int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum())
