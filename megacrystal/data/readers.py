"""Read corpora as they ship: JSONL (plain, gzip, zstd), Parquet, Hugging Face `save_to_disk` arrow, text trees.

The format comes from a file's first bytes, so a gzip named `.jsonl` is read as gzip. Readers yield `Batch`es of
raw items (JSONL lines as bytes, whole text files as bytes, or column values) in input order with the line or
row number of the first item; parsing and validation happen in `records.parse_batch`, which the tokenizer
workers run. A file that breaks mid-way (truncated archive, corrupt compression) ends with a `Batch` whose
`error` says where and why, and reading goes on with the next file.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from megacrystal.data.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # the IPC stream's continuation marker, as `save_to_disk` writes
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CORPUS_SUFFIXES = tuple(s + c for s in JSONL_SUFFIXES for c in ("", ".gz", ".zst", ".zstd")) + (".parquet",
                                                                                               ".arrow")
BATCH_BYTES = 1 << 20  # items per batch add up to about this many bytes: fewer hand-offs between threads
READ_BYTES = 1 << 20


@dataclass
class Batch:
    """Consecutive raw items of one input file; `kind` says how to parse them (jsonl, text or column)."""

    file: str
    kind: str
    first: int  # line (jsonl), row (column) or 0 (text file) of items[0], 1-based for lines and rows
    items: list = field(default_factory=list)
    error: str | None = None  # the file broke after these items: "<reason>" reported at file:first+len(items)
    extra: dict | None = None  # column kind: {filter field: values} aligned with items


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _hf_data_files(path: Path) -> list[Path] | None:
    """The arrow files of a `save_to_disk` directory (a Dataset, or a DatasetDict's train split), else None."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{path} is a Hugging Face DatasetDict without a 'train' split (splits: {splits}); "
                            f"name a split directory, e.g. {path}/{splits[0] if splits else '<split>'}")
        return _hf_data_files(path / "train")
    state = path / "state.json"
    if not state.is_file() or not (path / "dataset_info.json").is_file():
        return None
    files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{path}: state.json lists {missing[0]}, which is missing; re-save the dataset")
    return files


def _walk(path: Path, extensions: Sequence[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out += [Path(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and f.endswith(CORPUS_SUFFIXES + tuple(extensions))]
    return out


def expand_inputs(inputs: Sequence[str | os.PathLike], extensions: Sequence[str]) -> list[Path]:
    """Input files in order: globs expanded sorted, directories walked sorted (an HF dataset dir: its arrow files).

    Missing or unreadable paths are one-line errors here, before any work starts.
    """
    out: list[Path] = []
    for item in inputs:
        text = str(item)
        if _has_glob(text) and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"input glob {text} matches no file; fix the dataset's inputs")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(text)]
        for path in paths:
            if path.is_dir():
                hf = _hf_data_files(path)
                found = hf if hf is not None else _walk(path, extensions)
                if not found:
                    raise DataError(f"input directory {path} holds no corpus file (.jsonl[.gz|.zst], .parquet, "
                                    f".arrow) nor any file with extensions {list(extensions)}; add files or "
                                    f"change the inputs")
                out += found
            elif path.is_file():
                out.append(path)
            else:
                raise DataError(f"input {path} does not exist; fix the dataset's inputs (JSONL[.gz|.zst], "
                                f"Parquet, a Hugging Face dataset directory, text files, a directory or a glob)")
    for path in out:
        if not os.access(path, os.R_OK):
            raise DataError(f"input {path} is not readable (permissions); fix its mode or the dataset's inputs")
    return out


def sniff(path: Path) -> str:
    """The container of a file from its first bytes: gzip, zstd, parquet, arrow, arrow-stream or plain."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ARROW_FILE_MAGIC):
        return "arrow"
    if head.startswith(ARROW_STREAM_MAGIC):
        return "arrow-stream"
    return "plain"


class TruncatedInput(Exception):
    """A compressed stream ended before its end-of-frame marker."""


class _ZstdReader(io.RawIOBase):
    """A zstd file as a raw stream, across frames, raising TruncatedInput if the last frame is incomplete.

    zstandard's stream_reader returns a truncated file's complete blocks then a clean EOF; `decompressobj()`
    with its `eof` flag tells a finished frame from a cut one.
    """

    def __init__(self, path: Path):
        import zstandard

        self._zstd = zstandard
        self._fh = path.open("rb")
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending and not self._done:
            chunk = self._fh.read(READ_BYTES)
            if not chunk:
                self._done = True
                if not self._obj.eof:
                    raise TruncatedInput("truncated zstd archive (the last frame has no end)")
                break
            try:
                self._pending = self._obj.decompress(chunk)
            except self._zstd.ZstdError as e:
                raise TruncatedInput(f"corrupt zstd data ({e})") from None
            while self._obj.eof and self._obj.unused_data:  # another frame follows (pzstd, concatenation)
                rest = self._obj.unused_data
                self._obj = self._zstd.ZstdDecompressor().decompressobj()
                try:
                    self._pending += self._obj.decompress(rest)
                except self._zstd.ZstdError as e:
                    raise TruncatedInput(f"corrupt zstd data ({e})") from None
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_decompressed(path: Path, container: str):
    if container == "gzip":
        return gzip.open(path, "rb")
    if container == "zstd":
        return io.BufferedReader(_ZstdReader(path), READ_BYTES)
    return path.open("rb")


_STREAM_ERRORS = (TruncatedInput, EOFError, gzip.BadGzipFile, zlib.error, OSError)


def _is_jsonl(path: Path, first: bytes, extensions: Sequence[str], compressed: bool) -> bool:
    """JSONL by name; else a compressed file by content (`{` first), a source file never."""
    name = path.name
    for suffix in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return True
    if name.endswith(tuple(extensions)) and not compressed:
        return False
    return first.lstrip()[:1] == b"{"


def _line_batches(path: Path, stream) -> Iterator[Batch]:
    batch, size, line = Batch(str(path), "jsonl", 1), 0, 0
    try:
        for line, raw in enumerate(stream, 1):
            batch.items.append(raw)
            size += len(raw)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = Batch(str(path), "jsonl", line + 1), 0
    except _STREAM_ERRORS as e:
        batch.error = _reason(e)
    yield batch


def _reason(e: Exception) -> str:
    if isinstance(e, EOFError):
        return "truncated gzip archive"
    if isinstance(e, (gzip.BadGzipFile, zlib.error)):
        return f"corrupt gzip data ({e})"
    return str(e) or type(e).__name__


def _column_batches(path: Path, container: str, text_field: str, filter_fields: Sequence[str]) -> Iterator[Batch]:
    """Rows of a Parquet file (by row group) or an arrow file/stream, only the columns needed."""
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet as pq

    top = sorted({f.split(".")[0] for f in [text_field, *filter_fields]})
    row = 1
    try:
        if container == "parquet":
            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            batches = (pf.read_row_group(i, columns=[c for c in top if c in names])
                       for i in range(pf.num_row_groups))
        else:
            reader = pa.ipc.open_file(path) if container == "arrow" else pa.ipc.open_stream(path)
            names = set(reader.schema.names)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if container == "arrow" \
                else iter(reader)
        if text_field.split(".")[0] not in names:
            yield Batch(str(path), "column", row, error=f"no column '{text_field.split('.')[0]}' (columns: "
                                                        f"{', '.join(sorted(names))}); set the dataset's "
                                                        f"text_field")
            return
        for table in batches:
            cols = {c: table.column(c).to_pylist() for c in top if c in names}
            n = table.num_rows
            for start in range(0, n, 4096):
                texts = _field_values(cols, text_field, start, start + 4096)
                extra = {f: _field_values(cols, f, start, start + 4096) for f in filter_fields}
                yield Batch(str(path), "column", row + start, texts, extra=extra)
            row += n
    except (pa.ArrowException, OSError) as e:
        yield Batch(str(path), "column", row, error=f"unreadable {container} data ({type(e).__name__}: {e})")


def _field_values(cols: dict, dotted: str, start: int, stop: int) -> list:
    head, *rest = dotted.split(".")
    values = cols.get(head, [None] * (stop - start))[start:stop]
    for key in rest:
        values = [v.get(key) if isinstance(v, dict) else None for v in values]
    return values


def read_batches(path: Path, text_field: str, filter_fields: Sequence[str],
                 extensions: Sequence[str]) -> Iterator[Batch]:
    """Batches of raw items of one input file, whatever its format."""
    try:
        container = sniff(path)
    except OSError as e:
        yield Batch(str(path), "text", 0, error=f"unreadable file ({e.strerror or e})")
        return
    if container in ("parquet", "arrow", "arrow-stream"):
        yield from _column_batches(path, container, text_field, filter_fields)
        return
    try:
        stream = _open_decompressed(path, container)
    except OSError as e:
        yield Batch(str(path), "text", 0, error=f"unreadable file ({e.strerror or e})")
        return
    with stream:
        try:
            first = stream.peek(64)[:64] if hasattr(stream, "peek") else b""
        except _STREAM_ERRORS as e:
            yield Batch(str(path), "jsonl", 1, error=_reason(e))
            return
        if _is_jsonl(path, first, extensions, container != "plain"):
            yield from _line_batches(path, stream)
            return
        try:
            yield Batch(str(path), "text", 0, [stream.read()])
        except _STREAM_ERRORS as e:
            yield Batch(str(path), "text", 0, error=_reason(e))


def iter_batches(files: Sequence[Path], text_field: str, filter_fields: Sequence[str],
                 extensions: Sequence[str]) -> Iterator[Batch]:
    """Batches of every file in order; whole small text files are grouped into one batch."""
    pending: Batch | None = None
    size = 0
    for path in files:
        for batch in read_batches(path, text_field, filter_fields, extensions):
            if batch.kind == "text" and batch.error is None:
                if pending is None:
                    pending, size = Batch("", "text", 0, [], extra={"files": []}), 0
                pending.items += batch.items
                pending.extra["files"].append(batch.file)
                size += len(batch.items[0])
                if size >= BATCH_BYTES:
                    yield pending
                    pending = None
                continue
            if pending is not None:
                yield pending
                pending = None
            yield batch
    if pending is not None:
        yield pending
