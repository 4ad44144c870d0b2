"""Tokenize text into megatron-core indexed datasets (train + held-out valid split) with a skip-if-unchanged meta."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megacrystal.data import indexed
from megacrystal.data.corpus import provenance_path
from megacrystal.data.errors import DataError
from megacrystal.data.tokenizer import CrystalTokenizer

PREPARE_VERSION = 1  # bump when the output layout or document rules change, so old datasets are rebuilt
# Crystal's data prep ran with seed 45 (crystal-spec §3.4); reused as the default split seed.
DEFAULT_SEED = 45
DEFAULT_EXTENSIONS = (".py", ".html", ".htm", ".css", ".js", ".mjs", ".ts", ".c", ".h", ".cc", ".cpp", ".java",
                      ".go", ".rs", ".sh", ".md", ".rst", ".txt")


@dataclass(frozen=True)
class PrepareResult:
    """What prepare_dataset did ("built" or "skipped") and the dataset's meta."""

    status: str
    out_prefix: str
    meta: dict


def meta_path(out_prefix: str | os.PathLike) -> Path:
    """`<out_prefix>.meta.json`, written last so its presence means the dataset is complete."""
    return Path(f"{out_prefix}.meta.json")


def _expand(inputs: Sequence[str | os.PathLike], extensions: Sequence[str]) -> list[Path]:
    """Input files in order: JSONL and .txt files as given, directories walked in sorted order."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
                out += [Path(dirpath, f) for f in sorted(filenames)
                        if f.endswith(".jsonl") or f.endswith(tuple(extensions))]
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(f"input {path} does not exist; fix the dataset's inputs (JSONL, .txt or a directory)")
    if not out:
        raise DataError(f"inputs {[str(i) for i in inputs]} contain no .jsonl file nor any file with extensions "
                        f"{list(extensions)}; add files or change the extension list")
    return out


def _texts(files: Sequence[Path], text_field: str) -> Iterator[str]:
    """Documents in order: each JSONL line's text field, each other file whole; blank documents dropped."""
    for path in files:
        if path.suffix != ".jsonl":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
            continue
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove the line") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: no string field '{text_field}'; set the dataset's "
                                    f"text_field to the field holding the text")
                if text.strip():
                    yield text


def _held_out_score(text: str, seed: int) -> float:
    """A uniform [0, 1) score from the document's content, so a document's split never depends on its neighbours."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def _file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _inputs_fingerprint(files: Sequence[Path]) -> tuple[str, list[dict]]:
    """Content hash of the inputs in order: rewriting a file with the same bytes (a corpus rebuild) changes nothing."""
    listing = [_file_digest(p) for p in files]
    joined = "\n".join(f"{f['bytes']}:{f['sha256']}" for f in listing)
    return hashlib.sha256(joined.encode()).hexdigest(), listing


def _provenance(inputs: Sequence[str | os.PathLike], files: Sequence[Path]) -> dict:
    """Corpus provenance found next to the inputs (`<stem>.provenance.json`, or a directory's provenance.json)."""
    candidates = [(str(f), provenance_path(f)) for f in files if f.suffix == ".jsonl"]
    candidates += [(str(i), Path(i) / "provenance.json") for i in inputs if Path(i).is_dir()]
    return {key: json.loads(path.read_text()) for key, path in candidates if path.is_file()}


_WORKER_TOKENIZER: CrystalTokenizer | None = None


def _init_worker(tokenizer: CrystalTokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode(text: str) -> np.ndarray:
    tok = _WORKER_TOKENIZER
    ids = tok.encode(text)
    ids.append(tok.eos_id)  # every document ends with EOS, as Crystal's packed data did (eos_id 2)
    return np.asarray(ids, dtype=indexed.token_dtype(tok.vocab_size))


def _tokenized(texts: Iterator[str], tokenizer: CrystalTokenizer, workers: int) -> Iterator[np.ndarray]:
    """Token arrays in input order, from a worker pool when workers > 1."""
    if workers <= 1:
        _init_worker(tokenizer)
        yield from map(_encode, texts)
        return
    # fork where available: no __main__ guard needed in callers' scripts, and workers only run sentencepiece.
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods and sys.platform == "linux" else None)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode, texts, chunksize=16)


def _options(text_field: str, valid_fraction: float, seed: int, extensions: Sequence[str]) -> dict:
    return {"text_field": text_field, "valid_fraction": valid_fraction, "seed": seed,
            "extensions": sorted(extensions), "prepare_version": PREPARE_VERSION}


def _is_current(out_prefix: str, tokenizer: CrystalTokenizer, inputs_fp: str, options: dict) -> dict | None:
    """The existing meta when the dataset was built from the same inputs, tokenizer and options, else None."""
    path = meta_path(out_prefix)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = (meta.get("tokenizer", {}).get("fingerprint") == tokenizer.fingerprint()
            and meta.get("inputs", {}).get("fingerprint") == inputs_fp and meta.get("options") == options)
    present = all(p.is_file() for s in indexed.SPLITS for p in indexed.files(indexed.split_prefix(out_prefix, s)))
    return meta if same and present else None


def prepare_dataset(name: str, inputs: Sequence[str | os.PathLike], tokenizer: CrystalTokenizer,
                    out_prefix: str | os.PathLike, text_field: str = "text", workers: int = 2,
                    valid_fraction: float = 0.01, seed: int = DEFAULT_SEED,
                    extensions: Sequence[str] = DEFAULT_EXTENSIONS, force: bool = False,
                    progress: bool = True) -> PrepareResult:
    """Tokenize inputs into `<out_prefix>_{train,valid}.{bin,idx}` + `<out_prefix>.meta.json`; skip if unchanged."""
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"dataset '{name}': valid_fraction {valid_fraction} must be in [0, 1)")
    out_prefix = str(out_prefix)
    files = _expand(inputs, extensions)
    inputs_fp, listing = _inputs_fingerprint(files)
    options = _options(text_field, valid_fraction, seed, extensions)
    if not force and (meta := _is_current(out_prefix, tokenizer, inputs_fp, options)) is not None:
        return PrepareResult("skipped", out_prefix, meta)

    # Pass 1 scores every document so the split is known up front (and tqdm gets a total): reading text twice
    # is cheap next to tokenizing it.
    scores = [_held_out_score(t, seed) for t in _texts(files, text_field)]
    if not scores:
        raise DataError(f"dataset '{name}': inputs {[str(i) for i in inputs]} hold no non-blank document")
    held_out = [s < valid_fraction for s in scores]
    if valid_fraction > 0 and not any(held_out) and len(scores) > 1:
        held_out[int(np.argmin(scores))] = True  # evaluation needs at least one document
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    # A build interrupted half-way must not look complete next to an old meta.
    meta_path(out_prefix).unlink(missing_ok=True)

    start = time.perf_counter()
    bar = tqdm(total=len(scores), unit="doc", desc=f"prepare {name}", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    vocab = tokenizer.vocab_size
    with indexed.writer(indexed.split_prefix(out_prefix, "train"), vocab) as train, \
            indexed.writer(indexed.split_prefix(out_prefix, "valid"), vocab) as valid:
        for i, ids in enumerate(_tokenized(_texts(files, text_field), tokenizer, workers)):
            (valid if held_out[i] else train).add(ids)
            bar.update(1)
            if i % 64 == 0:
                rate = (train.tokens + valid.tokens) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    tokens = train.tokens + valid.tokens
    meta = {
        "name": name, "prepare_version": PREPARE_VERSION,
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                      "base_vocab_size": tokenizer.base_vocab_size, "eos_id": tokenizer.eos_id,
                      "source": tokenizer.source},
        "inputs": {"fingerprint": inputs_fp, "files": listing},
        "options": options,
        "dtype": np.dtype(train.dtype).name,
        "splits": {"train": {"documents": train.documents, "tokens": train.tokens},
                   "valid": {"documents": valid.documents, "tokens": valid.tokens}},
        "documents": train.documents + valid.documents, "tokens": tokens,
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "provenance": _provenance(inputs, files),
    }
    tmp = meta_path(out_prefix).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta_path(out_prefix))
    if progress:
        print(f"prepared {name}: {meta['documents']} documents, {tokens:,} tokens "
              f"(valid {valid.documents} docs) in {seconds:.1f}s, {meta['tokens_per_s']:,.0f} tokens/s",
              file=sys.stderr)
    return PrepareResult("built", out_prefix, meta)


def check_dataset(prefix: str | os.PathLike, tokenizer: CrystalTokenizer) -> dict:
    """Raise DataError unless `<prefix>` is a complete dataset tokenized with this tokenizer; return its meta."""
    prefix = str(prefix)
    datasets = {}
    for split in indexed.SPLITS:
        datasets[split] = indexed.open_dataset(indexed.split_prefix(prefix, split))
    path = meta_path(prefix)
    if not path.is_file():
        raise DataError(f"dataset {prefix}: {path} is missing, so its tokenizer is unknown; "
                        f"run `megacrystal prepare` to build it")
    meta = json.loads(path.read_text())
    name = meta.get("name", prefix)
    vocab = meta["tokenizer"]["vocab_size"]
    if vocab != tokenizer.vocab_size:
        raise DataError(f"dataset '{name}' ({prefix}) was prepared for vocabulary size {vocab} but the tokenizer "
                        f"has {tokenizer.vocab_size}; re-run `megacrystal prepare` or fix the padded vocab size")
    if meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
        raise DataError(f"dataset '{name}' ({prefix}) was tokenized with another tokenizer "
                        f"({meta['tokenizer']['source']}); re-run `megacrystal prepare` with this one")
    for split, ds in datasets.items():
        tokens = indexed.count_tokens(ds)
        bin_bytes = indexed.files(indexed.split_prefix(prefix, split))[1].stat().st_size
        expected = meta["splits"][split]["tokens"]
        if tokens != expected or bin_bytes != tokens * np.dtype(ds.index.dtype).itemsize:
            raise DataError(f"dataset '{name}' split {split}: {tokens} tokens in the index, {bin_bytes} bytes in "
                            f"the .bin, {expected} in the meta; delete {path} and re-run `megacrystal prepare`")
    return meta
