"""Tokenize a dataset's inputs into numbered megatron shards in one streaming pass with bounded memory.

Each shard (a fixed group of input files) is read, parsed and tokenized in batches by tokenizer threads
(sentencepiece encodes without the GIL, so no text or token array is pickled), split into train/valid per
document by a hash of its content, and written atomically; a complete shard whose inputs, tokenizer and options
are unchanged is skipped, so a killed run resumes where it stopped and `--shard-index i --num-shards n` splits
the work over machines. No torch is imported here.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from megacrystal.data import indexed, shards
from megacrystal.data.corpus import provenance_path
from megacrystal.data.errors import DataError
from megacrystal.data.progress import Progress
from megacrystal.data.readers import expand_inputs, iter_batches
from megacrystal.data.records import BadRecords, parse_batch
from megacrystal.data.tokenizer import CrystalTokenizer
from megacrystal.data.workers import ThreadPool

FORMAT_VERSION = 2  # bump when the output layout or document rules change, so old datasets are rebuilt
PREPARE_VERSION = FORMAT_VERSION
# Crystal's data prep ran with seed 45 (crystal-spec §3.4); reused as the default split seed.
DEFAULT_SEED = 45
DEFAULT_EXTENSIONS = (".py", ".html", ".htm", ".css", ".js", ".mjs", ".ts", ".c", ".h", ".cc", ".cpp", ".java",
                      ".go", ".rs", ".sh", ".md", ".rst", ".txt")
LENGTH_BINS = np.array([0, 2**6, 2**7, 2**8, 2**9, 2**10, 2**11, 2**12, 2**13, 2**14, 2**15, 2**16, 2**62])


@dataclass(frozen=True)
class PrepareResult:
    """What prepare_dataset did ("built", "skipped" or "partial": only some shards here) and the meta."""

    status: str
    out_prefix: str
    meta: dict


@dataclass(frozen=True)
class Options:
    """Everything besides inputs and tokenizer that changes the prepared tokens."""

    text_field: str = "text"
    filters: Mapping[str, tuple] = field(default_factory=dict)
    valid_fraction: float = 0.01
    seed: int = DEFAULT_SEED
    extensions: tuple = DEFAULT_EXTENSIONS
    shard_bytes: int = shards.DEFAULT_SHARD_BYTES
    drop: str | None = None  # fingerprint of the dedup drop list applied, if any

    def as_dict(self) -> dict:
        return {"text_field": self.text_field, "filters": {k: sorted(v) for k, v in sorted(self.filters.items())},
                "valid_fraction": self.valid_fraction, "seed": self.seed, "extensions": sorted(self.extensions),
                "shard_bytes": self.shard_bytes, "drop": self.drop, "format_version": FORMAT_VERSION}


def meta_path(out_prefix: str | os.PathLike) -> Path:
    """`<out_prefix>.meta.json`, written last so its presence means the dataset is complete."""
    return Path(f"{out_prefix}.meta.json")


def fingerprint(tokenizer_fp: str, options: dict, listing: Sequence[dict]) -> str:
    """What made a shard or dataset: tokenizer, options and the input files (names and sizes, in order)."""
    key = {"tokenizer": tokenizer_fp, "options": options,
           "files": [(Path(f["path"]).name, f["bytes"]) for f in listing]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def utf8_documents(texts: Sequence[str]) -> tuple[list[bytes], int]:
    """The texts as UTF-8 (hashed for the split, and read by sentencepiece without converting them again), and
    how many were repaired: JSON may escape a lone surrogate ("\\ud800"), which sentencepiece rejects, so each
    one becomes U+FFFD, as a UTF-8 decoder writes for bytes it cannot read."""
    out, repaired = [], 0
    for text in texts:
        try:
            out.append(text.encode("utf-8"))
        except UnicodeEncodeError:
            out.append(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8"))
            repaired += 1
    return out, repaired


# --- the worker side: raw batch in, token arrays out ---------------------------------------------------------
class _Tokenize:
    """Parse, score, drop duplicates and tokenize one batch; run by the tokenizer threads."""

    def __init__(self, tokenizer: CrystalTokenizer, options: Options, drop: frozenset | None):
        self.tokenizer, self.options, self.drop = tokenizer, options, drop
        self.dtype = indexed.token_dtype(tokenizer.vocab_size)
        self.seed = options.seed.to_bytes(8, "little", signed=True)

    def __call__(self, batch):
        opts = self.options
        parsed = parse_batch(batch, opts.text_field, opts.filters)
        texts = parsed.texts
        removed = 0
        if self.drop:
            keep = [w not in self.drop for w in parsed.where]
            removed = len(keep) - sum(keep)
            texts = [t for t, k in zip(texts, keep) if k]
        encoded, parsed.repaired = utf8_documents(texts)
        # Each document ends with EOS, as Crystal's packed data did.
        tokens, lengths = self.tokenizer.encode_documents(encoded, self.dtype)
        seed = self.seed
        scores = np.array([int.from_bytes(hashlib.sha256(seed + b).digest()[:8], "little") / 2.0**64
                           for b in encoded], dtype=np.float64)
        nbytes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        parsed.texts, parsed.where = [], []
        return tokens, lengths, scores, nbytes, parsed, removed


# --- the main side ---------------------------------------------------------------------------------------------
def _shard_current(shard_prefix: str, fp: str, listing: Sequence[dict]) -> dict | None:
    path = shards.meta_path(shard_prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("fingerprint") != fp or shards.changed_files(meta.get("files", []), listing):
        return None
    present = all(p.is_file() for s in indexed.SPLITS for p in indexed.files(indexed.split_prefix(shard_prefix, s)))
    return meta if present else None


def _build_shard(name: str, shard_prefix: str, files: Sequence[Path], fp: str, listing: list[dict],
                 pool: ThreadPool, opts: Options, tokenizer: CrystalTokenizer, bad: BadRecords,
                 progress: Progress) -> dict:
    start = time.perf_counter()
    shards.meta_path(shard_prefix).unlink(missing_ok=True)
    out = shards.ShardWriter(shard_prefix, tokenizer.vocab_size)
    own = BadRecords(name, bad.max_fraction)
    hist = np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)
    text_bytes = removed = 0
    # The inputs' hashes (for the stale-data check) are computed beside the tokenizing, not after it.
    hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    digests = [hasher.submit(shards.file_sha256, Path(f["path"])) for f in listing]
    hasher.shutdown(wait=False)
    try:
        batches = iter_batches(files, opts.text_field, list(opts.filters), opts.extensions)
        for tokens, lengths, scores, nbytes, parsed, dropped in pool.map(batches):
            out.add(tokens, lengths, scores < opts.valid_fraction, scores)
            own.add(parsed)
            bad.add(parsed)
            bad.check(final=False)
            removed += dropped
            text_bytes += int(nbytes.sum())
            hist += np.histogram(lengths, LENGTH_BINS)[0]
            progress.update(len(lengths), int(nbytes.sum()), int(tokens.size))
        out.finish(need_valid=opts.valid_fraction > 0)
    except OSError as e:  # the readers turn input errors into bad records: this is the output side
        out.abort()
        raise DataError(f"dataset '{name}': writing shard {shard_prefix} failed ({e.strerror or e}); fix the "
                        f"disk under {Path(shard_prefix).parent} (space, permissions) and rerun prepare: finished "
                        f"shards are kept") from e
    except BaseException:
        out.abort()
        raise
    sw = out.splits
    meta = {"fingerprint": fp, "files": [dict(f, sha256=d.result()) for f, d in zip(listing, digests)],
            "splits": {s: {"documents": w.documents, "tokens": w.tokens} for s, w in sw.items()},
            "text_bytes": text_bytes, "records": own.as_dict(), "duplicates_removed": removed,
            "length_histogram": hist.tolist(), "seconds": round(time.perf_counter() - start, 3)}
    shards.write_json(shards.meta_path(shard_prefix), meta)  # last: its presence means the shard is complete
    return meta


def _dataset_meta(name: str, tokenizer: CrystalTokenizer, opts: Options, out_prefix: str, listing: list[dict],
                  shard_metas: list[dict], inputs, files) -> dict:
    splits = {s: {"documents": sum(m["splits"][s]["documents"] for m in shard_metas),
                  "tokens": sum(m["splits"][s]["tokens"] for m in shard_metas)} for s in indexed.SPLITS}
    records = BadRecords(name, 0.0)
    for m in shard_metas:
        records.merge(m["records"])
    tokens = sum(s["tokens"] for s in splits.values())
    text_bytes = sum(m["text_bytes"] for m in shard_metas)
    files_meta = [f for m in shard_metas for f in m["files"]]
    seconds = sum(m["seconds"] for m in shard_metas)
    return {
        "name": name, "format_version": FORMAT_VERSION, "prepare_version": FORMAT_VERSION,
        "fingerprint": fingerprint(tokenizer.fingerprint(), opts.as_dict(), listing),
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                      "base_vocab_size": tokenizer.base_vocab_size, "eos_id": tokenizer.eos_id,
                      "source": tokenizer.source},
        "inputs": {"files": files_meta}, "options": opts.as_dict(),
        "dtype": np.dtype(indexed.token_dtype(tokenizer.vocab_size)).name,
        "shards": [shards.prefix(Path(out_prefix).name, i) for i in range(len(shard_metas))],
        "splits": splits, "documents": splits["train"]["documents"] + splits["valid"]["documents"],
        "tokens": tokens, "text_bytes": text_bytes, "tokens_per_byte": round(tokens / max(text_bytes, 1), 4),
        "records": records.as_dict(), "duplicates_removed": sum(m["duplicates_removed"] for m in shard_metas),
        "length_bins": LENGTH_BINS[:-1].tolist(),
        "length_histogram": np.sum([m["length_histogram"] for m in shard_metas], axis=0).tolist(),
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "provenance": _provenance(inputs, files),
    }


def _why_rebuild(old: Path, tok_fp: str, options: dict, listing: list[dict], force: bool) -> str:
    """What changed since the dataset was prepared, in a few words."""
    if force:
        return "--force"
    try:
        meta = json.loads(old.read_text())
    except json.JSONDecodeError:
        return "its meta is unreadable"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format version {meta.get('format_version')} -> {FORMAT_VERSION}"
    if meta.get("tokenizer", {}).get("fingerprint") != tok_fp:
        return "the tokenizer changed"
    diffs = [f"{k} {meta['options'].get(k)!r} -> {v!r}" for k, v in options.items()
             if meta.get("options", {}).get(k) != v]
    changes = diffs + shards.changed_files(meta.get("inputs", {}).get("files", []), listing)
    return ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "") if changes \
        else "shards missing or incomplete"


def _provenance(inputs, files: Sequence[Path]) -> dict:
    """Corpus provenance found next to the inputs (`<stem>.provenance.json`, or a directory's provenance.json)."""
    candidates = [(str(f), provenance_path(f)) for f in files if f.suffix == ".jsonl"]
    candidates += [(str(i), Path(i) / "provenance.json") for i in inputs if Path(str(i)).is_dir()]
    return {key: json.loads(path.read_text()) for key, path in candidates if path.is_file()}


def prepare_dataset(name: str, inputs: Sequence[str | os.PathLike], tokenizer: CrystalTokenizer,
                    out_prefix: str | os.PathLike, text_field: str = "text", workers: int = 2,
                    valid_fraction: float = 0.01, seed: int = DEFAULT_SEED,
                    extensions: Sequence[str] = DEFAULT_EXTENSIONS, force: bool = False,
                    progress: bool = True, filters: Mapping[str, Sequence[str]] | None = None,
                    max_bad_fraction: float = 0.01, shard_bytes: int = shards.DEFAULT_SHARD_BYTES,
                    shard_index: int = 0, num_shards: int = 1, drop: frozenset | None = None,
                    drop_fingerprint: str | None = None, dedup_counts: dict | None = None) -> PrepareResult:
    """Tokenize inputs into `<out_prefix>-NNNNN_{train,valid}.{bin,idx}` shards + `<out_prefix>.meta.json`."""
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"dataset '{name}': valid_fraction {valid_fraction} must be in [0, 1)")
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    out_prefix = str(out_prefix)
    opts = Options(text_field, {k: tuple(v if isinstance(v, (list, tuple)) else [v]) for k, v in
                                (filters or {}).items()}, valid_fraction, seed, tuple(extensions), shard_bytes,
                   drop_fingerprint if drop is not None else None)
    files = expand_inputs(inputs, extensions)
    listing = shards.stat_listing(files)
    groups = shards.plan(files, [f["bytes"] for f in listing], shard_bytes)
    tok_fp, options = tokenizer.fingerprint(), opts.as_dict()
    fps = [fingerprint(tok_fp, options, [listing[i] for i in g]) for g in groups]
    prefixes = [shards.prefix(out_prefix, i) for i in range(len(groups))]
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)

    done = {i: m for i in range(len(groups))
            if not force and (m := _shard_current(prefixes[i], fps[i], [listing[j] for j in groups[i]]))}
    mine = [i for i in range(len(groups)) if i % num_shards == shard_index and i not in done]
    old = meta_path(out_prefix)
    if mine and progress and old.is_file():
        print(f"prepare {name}: {_why_rebuild(old, tok_fp, options, listing, force)}; re-preparing "
              f"{len(mine)} of {len(groups)} shard(s)", file=sys.stderr)
    if mine or len(done) < len(groups):
        old.unlink(missing_ok=True)  # the dataset is not complete until every shard is
    elif old.is_file():
        meta = json.loads(old.read_text())
        if meta.get("fingerprint") == fingerprint(tok_fp, options, listing):
            return PrepareResult("skipped", out_prefix, meta)

    bad = BadRecords(name, max_bad_fraction)
    for m in done.values():
        bad.merge(m["records"])
    total_bytes = sum(listing[j]["bytes"] for i in mine for j in groups[i])
    bar = Progress(f"prepare {name}", total_bytes, enabled=progress)
    pool = ThreadPool(workers, _Tokenize(tokenizer, opts, drop)) if mine else None
    try:
        for i in mine:
            done[i] = _build_shard(name, prefixes[i], [files[j] for j in groups[i]], fps[i],
                                   [listing[j] for j in groups[i]], pool, opts, tokenizer, bad, bar)
            bar.file_done(sum(listing[j]["bytes"] for j in groups[i]))
    finally:
        if pool is not None:
            pool.close()
    bar.close()
    if len(done) < len(groups):
        missing = [i for i in range(len(groups)) if i not in done]
        return PrepareResult("partial", out_prefix, {"shards_missing": missing, "shards": len(groups)})
    metas = [done[i] for i in range(len(groups))]
    bad_all = BadRecords(name, max_bad_fraction)
    for m in metas:
        bad_all.merge(m["records"])
    bad_all.check(final=True)
    meta = _dataset_meta(name, tokenizer, opts, out_prefix, listing, metas, inputs, files)
    meta["dedup"] = dedup_counts or {}
    if meta["documents"] == 0:
        raise DataError(f"dataset '{name}': inputs {[str(i) for i in inputs]} hold no non-blank document "
                        f"(records: {meta['records']['bad']} bad, {meta['records']['filtered']} filtered out, "
                        f"{meta['duplicates_removed']} duplicates removed); "
                        f"check the inputs, text_field and filters")
    shards.remove_shards_from(out_prefix, len(groups))
    shards.write_json(meta_path(out_prefix), meta)
    if progress:
        r = meta["records"]
        repaired = f", {r['repaired']} with lone surrogates repaired" if r["repaired"] else ""
        print(f"prepared {name}: {meta['documents']:,} documents, {meta['tokens']:,} tokens in {len(groups)} "
              f"shard(s) (valid {meta['splits']['valid']['documents']} docs; {r['bad']} bad, {r['filtered']} "
              f"filtered, {meta['duplicates_removed']} duplicates removed{repaired}); "
              f"{meta['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
        for example in r["examples"]:
            print(f"  skipped {example}", file=sys.stderr)
    return PrepareResult("built" if mine else "skipped", out_prefix, meta)


def shard_prefixes(prefix: str | os.PathLike, meta: dict) -> list[str]:
    """The shard prefixes of a prepared dataset, next to its meta."""
    return [str(Path(prefix).parent / s) for s in meta["shards"]]


def train_bins(prefix: str | os.PathLike, split: str = "train") -> list[Path]:
    """The `.bin` files of one split of a prepared dataset, shard by shard."""
    meta = json.loads(meta_path(prefix).read_text())
    return [indexed.files(indexed.split_prefix(p, split))[1] for p in shard_prefixes(prefix, meta)]


def check_dataset(prefix: str | os.PathLike, tokenizer: CrystalTokenizer) -> dict:
    """Raise DataError unless `<prefix>` is a complete dataset tokenized with this tokenizer; return its meta."""
    prefix = str(prefix)
    path = meta_path(prefix)
    if not path.is_file():
        first = indexed.split_prefix(shards.prefix(prefix, 0), "train")
        indexed.read_index(first)  # names the missing shard file when shards are missing too
        raise DataError(f"dataset {prefix}: {path} is missing, so it is incomplete or its tokenizer is unknown; "
                        f"run `megacrystal prepare` to build it")
    meta = json.loads(path.read_text())
    name = meta.get("name", prefix)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"dataset '{name}' ({prefix}) has format version {meta.get('format_version')}, this "
                        f"megacrystal writes {FORMAT_VERSION}; re-run `megacrystal prepare`")
    vocab = meta["tokenizer"]["vocab_size"]
    if vocab != tokenizer.vocab_size:
        raise DataError(f"dataset '{name}' ({prefix}) was prepared for vocabulary size {vocab} but the tokenizer "
                        f"has {tokenizer.vocab_size}; re-run `megacrystal prepare` or fix the padded vocab size")
    if meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
        raise DataError(f"dataset '{name}' ({prefix}) was tokenized with another tokenizer "
                        f"({meta['tokenizer']['source']}); re-run `megacrystal prepare` with this one")
    for split in indexed.SPLITS:
        tokens = 0
        for shard in shard_prefixes(prefix, meta):
            sp = indexed.split_prefix(shard, split)
            dtype, lengths = indexed.read_index(sp)
            n = int(lengths.astype(np.int64).sum())
            bin_bytes = indexed.files(sp)[1].stat().st_size
            if bin_bytes != n * dtype.itemsize:
                raise DataError(f"dataset '{name}' {sp}: {n} tokens in the index but {bin_bytes} bytes in the "
                                f".bin; delete {path} and re-run `megacrystal prepare`")
            tokens += n
        expected = meta["splits"][split]["tokens"]
        if tokens != expected:
            raise DataError(f"dataset '{name}' split {split}: {tokens} tokens in the shards, {expected} in the "
                            f"meta; delete {path} and re-run `megacrystal prepare`")
    return meta
