"""Output shards of a prepared dataset: which input files make each shard, and writing one shard atomically.

A dataset `<out>` is the shards `<out>-00000 .. <out>-NNNNN` (each `_train` and `_valid` megatron `.bin/.idx`
pairs plus `<out>-00000.json`, written last), and `<out>.meta.json` once every shard is complete. The split of
files into shards depends only on the input files' sizes, so any number of machines or workers agree on it.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from megacrystal.data import indexed

DEFAULT_SHARD_BYTES = 256 << 20  # input bytes per shard: big enough to amortize, small enough to redo after a kill
SYNC_BYTES = 32 << 20  # token bytes written between background syncs of a shard's train file


def plan(files: Sequence[Path], sizes: Sequence[int], shard_bytes: int) -> list[list[int]]:
    """Consecutive groups of file positions, each closed once its files reach shard_bytes."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        current.append(i)
        total += size
        if total >= shard_bytes:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


def prefix(out_prefix: str, index: int) -> str:
    """`<out_prefix>-NNNNN`, the megatron-style prefix of one shard (its splits are `_train`, `_valid`)."""
    return f"{out_prefix}-{index:05d}"


def meta_path(shard_prefix: str) -> Path:
    """The shard's completion record, written after its data files."""
    return Path(f"{shard_prefix}.json")


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """Content hash of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stat_listing(files: Sequence[Path]) -> list[dict]:
    """Path, size and mtime of each file: the cheap part of a fingerprint."""
    out = []
    for p in files:
        st = p.stat()
        out.append({"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def changed_files(recorded: Sequence[dict], current: Sequence[dict]) -> list[str]:
    """What differs between a recorded and a current listing, as short phrases ([] when the same).

    Files are matched by position and name, not directory, so a moved or copied corpus is no change. An
    equal size with another mtime is re-hashed, so a rewrite with the same bytes (a corpus rebuild) is none.
    """
    out = []
    for r, f in zip(recorded, current):
        path = f["path"]
        if Path(r["path"]).name != Path(path).name:
            out.append(f"input {r['path']} replaced by {path}")
        elif r["bytes"] != f["bytes"]:
            out.append(f"input {path} changed ({r['bytes']} -> {f['bytes']} bytes)")
        elif r.get("mtime_ns") != f["mtime_ns"] and r.get("sha256") and file_sha256(Path(path)) != r["sha256"]:
            out.append(f"input {path} changed (same size, other content)")
    out += [f"input {r['path']} removed" for r in recorded[len(current):]]
    out += [f"input {f['path']} added" for f in current[len(recorded):]]
    return out


class ShardWriter:
    """The train and valid splits of one shard, written under temporary names and renamed when complete."""

    def __init__(self, shard_prefix: str, vocab_size: int):
        self.prefix = shard_prefix
        self.dtype = indexed.token_dtype(vocab_size)
        self._paths = {s: indexed.files(indexed.split_prefix(shard_prefix, s)) for s in indexed.SPLITS}
        self._fh = {s: open(self._tmp(self._paths[s][1]), "wb") for s in indexed.SPLITS}
        self.splits = {s: indexed.DocumentWriter(self._fh[s], self.dtype) for s in indexed.SPLITS}
        self._lowest: tuple[float, int] | None = None  # (score, train doc number): the valid fallback
        # The train file is synced to disk in the background as it grows, so the fsync that makes the shard
        # durable at the end waits only for its tail rather than idling the machine while all of it is written.
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="fdatasync")
        self._sync: Future | None = None
        self._unsynced = 0

    @staticmethod
    def _tmp(path: Path) -> Path:
        return path.with_name(path.name + ".tmp")

    def add(self, tokens: np.ndarray, lengths: np.ndarray, held_out: np.ndarray, scores: np.ndarray) -> None:
        """Write a batch of documents (concatenated tokens + lengths) to train or valid by `held_out`."""
        if not len(lengths):
            return
        self._unsynced += tokens.size * np.dtype(self.dtype).itemsize
        if self._unsynced >= SYNC_BYTES and (self._sync is None or self._sync.done()):
            if self._sync is not None:
                self._sync.result()  # a failed sync (disk full, I/O error) fails the shard
            self._fh["train"].flush()
            self._sync = self._syncer.submit(os.fdatasync, self._fh["train"].fileno())
            self._unsynced = 0
        train = self.splits["train"]
        if held_out.any():
            keep = ~held_out
            if keep.any():
                i = int(np.argmin(np.where(keep, scores, np.inf)))
                self._note_lowest(scores[i], train.documents + int(keep[:i].sum()))
            # Held-out documents are few: write the runs of documents between them as slices (no token masks).
            ends = np.cumsum(lengths, dtype=np.int64)
            for split, first, last in _runs(held_out):
                self.splits["valid" if split else "train"].add_many(
                    tokens[ends[first] - lengths[first]:ends[last - 1]], lengths[first:last])
        else:
            i = int(np.argmin(scores))
            self._note_lowest(scores[i], train.documents + i)
            train.add_many(tokens, lengths)

    def _note_lowest(self, score: float, doc: int) -> None:
        if self._lowest is None or score < self._lowest[0]:
            self._lowest = (float(score), doc)

    def _move_lowest_to_valid(self) -> None:
        """Evaluation needs a document: move train's lowest-scored one to valid, rewriting the train file."""
        train = self.splits["train"]
        doc = self._lowest[1]
        lengths = np.concatenate(train.lengths)
        itemsize = np.dtype(self.dtype).itemsize
        start = int(lengths[:doc].astype(np.int64).sum()) * itemsize
        size = int(lengths[doc]) * itemsize
        src = self._tmp(self._paths["train"][1])
        rewritten = src.with_name(src.name + "2")
        with src.open("rb") as fin, rewritten.open("wb") as fout:
            _copy(fin, fout, start)
            moved = np.frombuffer(fin.read(size), dtype=self.dtype)
            _copy(fin, fout, None)
        os.replace(rewritten, src)
        self.splits["valid"].add_many(moved, lengths[doc:doc + 1])
        train.lengths = [np.delete(lengths, doc)]
        train.documents -= 1
        train.tokens -= len(moved)

    def finish(self, need_valid: bool) -> None:
        """Close, move one document to valid if asked and none is there, write the indexes, rename all."""
        self._syncer.shutdown(wait=True)
        if self._sync is not None:
            self._sync.result()
        self._fh["train"].close()
        if need_valid and not self.splits["valid"].documents and self.splits["train"].documents > 1:
            self._move_lowest_to_valid()
        for split in indexed.SPLITS:
            fh = self._fh[split]
            if not fh.closed:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            with open(self._tmp(self._paths[split][1]), "rb+") as done:
                os.fsync(done.fileno())
        for split, (idx, bin_) in self._paths.items():
            self.splits[split].write_index(self._tmp(idx))
        for split, (idx, bin_) in self._paths.items():
            os.replace(self._tmp(bin_), bin_)
            os.replace(self._tmp(idx), idx)

    def abort(self) -> None:
        """Remove the temporary files of an unfinished shard."""
        self._syncer.shutdown(wait=True)
        for split, paths in self._paths.items():
            self._fh[split].close()
            for p in paths:
                self._tmp(p).unlink(missing_ok=True)


def _runs(flags: np.ndarray) -> list[tuple[bool, int, int]]:
    """(flag, first, end) of each run of equal flags, in order."""
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    bounds = [0, *edges.tolist(), len(flags)]
    return [(bool(flags[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _copy(fin, fout, count: int | None) -> None:
    while count is None or count > 0:
        block = fin.read(1 << 20 if count is None else min(1 << 20, count))
        if not block:
            break
        fout.write(block)
        if count is not None:
            count -= len(block)


def remove_shards_from(out_prefix: str, first: int) -> None:
    """Delete shard files numbered `first` and above (left over from a run with more shards)."""
    parent = Path(out_prefix).parent
    stem = Path(out_prefix).name + "-"
    for p in parent.glob(stem + "[0-9][0-9][0-9][0-9][0-9]*"):
        number = p.name[len(stem):len(stem) + 5]
        if number.isdigit() and int(number) >= first:
            p.unlink(missing_ok=True)
