"""Writers of small real-format corpora for the data tests: JSONL (plain, gzip, zstd), Parquet, HF save_to_disk."""
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_bytes(jsonl_bytes(records))
    return path


def write_gz(path: Path, records: list[dict]) -> Path:
    path.write_bytes(gzip.compress(jsonl_bytes(records)))
    return path


def write_zst(path: Path, records: list[dict], frames: int = 2) -> Path:
    """Streamed frames (no content size in the header, as SlimPajama's files), several frames concatenated."""
    data = jsonl_bytes(records)
    cut = [len(data) * i // frames for i in range(frames + 1)]
    with path.open("wb") as fh:
        for a, b in zip(cut, cut[1:]):
            with zstandard.ZstdCompressor().stream_writer(fh, closefd=False) as w:
                w.write(data[a:b])
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int = 7) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def write_hf_dir(path: Path, records: list[dict], files: int = 2) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes: arrow IPC stream shards, state.json, dataset_info.json."""
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    cut = [len(records) * i // files for i in range(files + 1)]
    for name, a, b in zip(names, cut, cut[1:]):
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.slice(a, b - a).to_batches(max_chunksize=5):
                w.write_batch(batch)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                 "_split": "train", "_format_type": None}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {k: {"dtype": "string", "_type": "Value"}
                                                                     for k in records[0]}}))
    return path
