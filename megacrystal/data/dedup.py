"""Deduplication across the datasets of a blend, as SlimPajama did: exact (hash of the normalized text) and near
(MinHash LSH over word 13-grams at Jaccard 0.8, with datasketch).

One pass before tokenizing reads every dataset in config order and keeps the first occurrence; later copies
are listed by where they are (file:line, file:row N or file) in `<data.dir>/dedup/<dataset>.json`, which the
tokenizing pass skips. The list is reused while the inputs and options are unchanged. Signatures are computed in
worker processes; the index itself lives in this process and grows with the corpus (8 bytes per document for
exact, about num_perm x 8 bytes for near), which is the price of deduplicating globally.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from megacrystal.data import shards
from megacrystal.data.progress import Progress
from megacrystal.data.readers import expand_inputs, iter_batches
from megacrystal.data.records import parse_batch

NUM_PERM = 128
SCHEME = "affine32"  # datasketch 2's collision-free permutations, 4 bytes per hash value
DEDUP_VERSION = 1
_PUNCT = str.maketrans("", "", string.punctuation)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """SlimPajama's normalization: lower case, no punctuation, runs of whitespace as one space."""
    return _SPACE.sub(" ", text.lower().translate(_PUNCT)).strip()


def exact_key(text: str) -> bytes:
    """16-byte hash of the normalized text."""
    return hashlib.blake2b(normalize(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def shingles(text: str, ngram: int) -> set[bytes]:
    """Word n-grams of the normalized text (the whole text when it is shorter than n words)."""
    words = normalize(text).split(" ")
    n = min(ngram, len(words))
    return {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}


def _hash32(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=4).digest(), "little")


_W: dict = {}


def _init(text_field: str, filters: Mapping, ngram: int, near: bool) -> None:
    _W.update(text_field=text_field, filters=filters, ngram=ngram, near=near)


def _signatures(batch):
    """(where, exact keys, MinHash hash values or None) of one batch's documents."""
    parsed = parse_batch(batch, _W["text_field"], _W["filters"])
    keys = [exact_key(t) for t in parsed.texts]
    sigs = None
    if _W["near"]:
        from datasketch import MinHash

        sigs = []
        for t in parsed.texts:
            m = MinHash(num_perm=NUM_PERM, seed=1, hashfunc=_hash32, scheme=SCHEME)
            m.update_batch(list(shingles(t, _W["ngram"])))
            sigs.append(m.hashvalues)
        sigs = np.array(sigs) if sigs else np.zeros((0, NUM_PERM), np.uint32)
    return parsed.where, keys, sigs


def _options(specs, near, threshold, ngram) -> dict:
    return {"version": DEDUP_VERSION, "near": near, "threshold": threshold, "ngram": ngram, "num_perm": NUM_PERM,
            "datasets": {n: {"text_field": kw["text_field"],
                             "filters": {k: sorted(v) for k, v in sorted(kw["filters"].items())}}
                         for n, (_, kw) in specs.items()}}


def dedup_datasets(specs: Mapping[str, tuple[Sequence[str], dict]], out_dir: Path, near: bool = True,
                   threshold: float = 0.8, ngram: int = 13, workers: int = 1,
                   extensions: Sequence[str] | None = None, progress: bool = True) -> dict:
    """{dataset: (frozenset of dropped locations, their fingerprint, counts)} over the datasets in order."""
    from megacrystal.data.prepare import DEFAULT_EXTENSIONS
    from megacrystal.data.workers import ProcessPool

    extensions = tuple(extensions or DEFAULT_EXTENSIONS)
    files = {n: expand_inputs(inputs, extensions) for n, (inputs, _) in specs.items()}
    listing = {n: shards.stat_listing(f) for n, f in files.items()}
    options = _options(specs, near, threshold, ngram)
    fp = hashlib.sha256(json.dumps({"options": options, "files": {
        n: [(Path(f["path"]).name, f["bytes"]) for f in fl] for n, fl in listing.items()}},
        sort_keys=True).encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "dedup.json"
    if summary.is_file():
        old = json.loads(summary.read_text())
        if old.get("fingerprint") == fp and not any(
                shards.changed_files(old["files"][n], listing[n]) for n in specs):
            return _load(out_dir, old)
    from datasketch import LeanMinHash, MinHashLSH

    seen: set[bytes] = set()
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM) if near else None
    result, counts = {}, {}
    for name, (inputs, kw) in specs.items():
        filters = {k: tuple(v) for k, v in kw["filters"].items()}
        initargs = (kw["text_field"], filters, ngram, near)
        _init(*initargs)
        pool = ProcessPool(workers, _signatures, _init, initargs)
        bar = Progress(f"dedup {name}", sum(f["bytes"] for f in listing[name]), enabled=progress)
        drops, exact, nearby, docs = [], 0, 0, 0
        try:
            batches = iter_batches(files[name], kw["text_field"], list(filters), extensions)
            for where, keys, sigs in pool.map(batches):
                for i, (w, key) in enumerate(zip(where, keys)):
                    docs += 1
                    if key in seen:
                        drops.append(w)
                        exact += 1
                        continue
                    seen.add(key)
                    if lsh is not None:
                        m = LeanMinHash(seed=1, hashvalues=sigs[i], scheme=SCHEME)
                        if lsh.query(m):
                            drops.append(w)
                            nearby += 1
                            continue
                        lsh.insert(f"{name}\0{w}", m, check_duplication=False)
                bar.update(len(keys), 0, 0)
        finally:
            pool.close()
        bar.close()
        counts[name] = {"documents": docs, "exact": exact, "near": nearby}
        shards.write_json(out_dir / f"{name}.json", {"fingerprint": fp, "drop": drops})
        result[name] = drops
        if progress:
            print(f"dedup {name}: {exact} exact and {nearby} near duplicates of {docs} documents", file=sys.stderr)
    shards.write_json(summary, {"fingerprint": fp, "options": options, "counts": counts,
                                "files": {n: [dict(f, sha256=shards.file_sha256(Path(f["path"]))) for f in fl]
                                          for n, fl in listing.items()}})
    return {n: (frozenset(d), _drop_fingerprint(d), counts[n]) for n, d in result.items()}


def _drop_fingerprint(drops: Sequence[str]) -> str:
    """What a dataset's shards depend on: its own drop list (another dataset's changes leave it alone)."""
    return hashlib.sha256("\n".join(sorted(drops)).encode()).hexdigest()


def _load(out_dir: Path, summary: dict) -> dict:
    out = {}
    for name, counts in summary["counts"].items():
        drops = json.loads((out_dir / f"{name}.json").read_text())["drop"]
        out[name] = (frozenset(drops), _drop_fingerprint(drops), counts)
    return out
