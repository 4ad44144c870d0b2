"""Thin helpers around megatron-core's indexed datasets (`.bin` tokens + `.idx` index)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megacrystal.data.errors import DataError

SPLITS = ("train", "valid")


def token_dtype(vocab_size: int) -> type[np.number]:
    """The smallest dtype megatron picks for this vocabulary (uint16 below 65500, else int32)."""
    return DType.optimal_dtype(vocab_size)


def split_prefix(out_prefix: str | os.PathLike, split: str) -> str:
    """`<out_prefix>_<split>`: the megatron path prefix of one split."""
    return f"{out_prefix}_{split}"


def files(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """The `.idx` and `.bin` paths of a megatron path prefix."""
    return Path(f"{prefix}.idx"), Path(f"{prefix}.bin")


class DocumentWriter:
    """Appends one document per call to an IndexedDatasetBuilder and counts documents and tokens."""

    def __init__(self, builder: IndexedDatasetBuilder, dtype: type[np.number]):
        self._builder = builder
        self.dtype = dtype
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        """Write one document (already ending with EOS) as a single sequence."""
        self._builder.add_document(np.asarray(tokens, dtype=self.dtype), [len(tokens)])
        self.documents += 1
        self.tokens += len(tokens)


@contextlib.contextmanager
def writer(prefix: str | os.PathLike, vocab_size: int) -> Iterator[DocumentWriter]:
    """Write `<prefix>.{bin,idx}` via temporary names renamed on success, so a crash leaves no half dataset."""
    idx, bin_ = files(prefix)
    tmp_idx, tmp_bin = idx.with_name(idx.name + ".tmp"), bin_.with_name(bin_.name + ".tmp")
    dtype = token_dtype(vocab_size)
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    try:
        yield DocumentWriter(builder, dtype)
        builder.finalize(str(tmp_idx))
    except BaseException:
        builder.data_file.close()
        for p in (tmp_idx, tmp_bin):
            p.unlink(missing_ok=True)
        raise
    os.replace(tmp_bin, bin_)
    os.replace(tmp_idx, idx)


def open_dataset(prefix: str | os.PathLike) -> IndexedDataset:
    """Open `<prefix>.{bin,idx}` memory-mapped, raising DataError naming the missing or broken file."""
    for path in files(prefix):
        if not path.is_file():
            raise DataError(f"dataset file {path} is missing; run `megacrystal prepare` to build it")
    try:
        return IndexedDataset(str(prefix), mmap=True)
    except Exception as e:  # megatron asserts on a bad header; the user needs the file name, not the assert
        raise DataError(f"dataset {prefix}.idx is unreadable ({type(e).__name__}: {e}); "
                        f"re-run `megacrystal prepare` to rebuild it") from None


def count_tokens(dataset: IndexedDataset) -> int:
    """Total tokens over all sequences of an indexed dataset."""
    return int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum())
