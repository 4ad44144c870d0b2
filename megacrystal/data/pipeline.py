"""`megacrystal prepare` end to end, and opening the prepared datasets for training.

Layout of `data.dir`: corpus/ (the embedded default corpus), tokenizer.model (+ its stamp), and per dataset
`<name>_{train,valid}.{bin,idx}` + `<name>.meta.json`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..config import Config
from ..config.data import CORPUS_PREFIX
from . import indexed
from .errors import DataError
from .tokenizer import CrystalTokenizer


def data_dir(config: Config) -> Path:
    return Path(config.data.dir.format(name=config.run.name))


def tokenizer_path(config: Config) -> Path:
    return Path(config.data.tokenizer.model) if config.data.tokenizer.model else data_dir(config) / "tokenizer.model"


def _resolve_inputs(config: Config, inputs: list[str], corpus: dict[str, Path]) -> list[str]:
    return [str(corpus[i[len(CORPUS_PREFIX):]]) if i.startswith(CORPUS_PREFIX) else i for i in inputs]


def _corpus_domains(config: Config) -> list[str]:
    return sorted({i[len(CORPUS_PREFIX):] for d in config.data.datasets.values() for i in d.inputs
                   if i.startswith(CORPUS_PREFIX)})


def _digest(paths: list[str], extra: object) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for path in paths:
        p = Path(path)
        h.update(p.read_bytes() if p.is_file() else str(sorted(p.rglob("*"))).encode())
    return h.hexdigest()


def _ensure_tokenizer(config: Config, corpus: dict[str, Path]) -> tuple[CrystalTokenizer, str]:
    """Load the configured tokenizer, or train one on data.tokenizer.train_on (skipped when unchanged)."""
    from .tokenizer import train_tokenizer

    tok = config.data.tokenizer
    path = tokenizer_path(config)
    if tok.model is None:
        inputs = [i for name in tok.train_on
                  for i in _resolve_inputs(config, config.data.datasets[name].inputs, corpus)]
        stamp = path.with_suffix(".stamp.json")
        want = _digest(inputs, {"vocab_size": tok.vocab_size})
        if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("digest") == want:
            status = "skipped"
        else:
            train_tokenizer(inputs, path.with_suffix(""), tok.vocab_size)
            stamp.write_text(json.dumps({"digest": want, "inputs": inputs}, indent=1))
            status = "trained"
    else:
        status = "loaded"
    return CrystalTokenizer.load(path, padded_vocab_size=config.model.vocab_size), status


def prepare(config: Config) -> dict:
    """Build the corpus, the tokenizer and every dataset of the config; unchanged datasets are skipped."""
    from .corpus import build_corpus
    from .prepare import prepare_dataset

    d = config.data
    out = data_dir(config)
    start = time.perf_counter()
    domains = _corpus_domains(config)
    corpus = build_corpus(out / "corpus", d.corpus_max_bytes, domains) if domains else {}
    tokenizer, tok_status = _ensure_tokenizer(config, corpus)
    print(f"tokenizer {tok_status}: {tokenizer_path(config)} (base {tokenizer.base_vocab_size} + "
          f"{tokenizer.num_tokens - tokenizer.base_vocab_size} special, {tokenizer.vocab_size} rows)",
          file=sys.stderr)
    report = {"tokenizer": tok_status, "datasets": {}}
    tokens = 0
    for name, ds in d.datasets.items():
        result = prepare_dataset(name, _resolve_inputs(config, ds.inputs, corpus), tokenizer, out / name,
                                 text_field=ds.text_field, workers=d.workers, valid_fraction=d.valid_fraction)
        report["datasets"][name] = {"status": result.status, "tokens": result.meta["tokens"]}
        tokens += result.meta["tokens"] if result.status == "built" else 0
        if result.status == "skipped":
            print(f"prepared {name}: unchanged, skipped", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(f"prepare done in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s over new datasets)",
          file=sys.stderr)
    return report


def open_streams(config: Config, split: str):
    """{dataset: TokenStream} for a split, after checking each dataset matches the tokenizer."""
    from .prepare import check_dataset
    from .source import TokenStream

    if not tokenizer_path(config).is_file():
        raise DataError(f"tokenizer {tokenizer_path(config)} is missing; run "
                        f"`megacrystal prepare --config ...` first")
    tokenizer = CrystalTokenizer.load(tokenizer_path(config), padded_vocab_size=config.model.vocab_size)
    streams = {}
    for name in config.data.datasets:
        prefix = data_dir(config) / name
        meta = check_dataset(prefix, tokenizer)
        bin_path = indexed.files(indexed.split_prefix(prefix, split))[1]
        streams[name] = TokenStream(str(bin_path), np.dtype(meta["dtype"]), config.model.seq_length)
    return tokenizer, streams
