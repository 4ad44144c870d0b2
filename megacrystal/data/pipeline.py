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


def _dataset_kwargs(config: Config, name: str) -> dict:
    d, ds = config.data, config.data.datasets[name]
    return dict(text_field=ds.text_field, filters=ds.filters, valid_fraction=d.valid_fraction,
                max_bad_fraction=d.max_bad_fraction, shard_bytes=d.shard_bytes)


def prepare(config: Config, shard_index: int = 0, num_shards: int = 1, workers: int | None = None,
            force: bool = False) -> dict:
    """Build the corpus, the tokenizer and every dataset of the config; unchanged shards are skipped."""
    from .corpus import build_corpus
    from .prepare import prepare_dataset
    from .report import import_plotting_in_background, write_report

    d = config.data
    out = data_dir(config)
    start = time.perf_counter()
    domains = _corpus_domains(config)
    corpus = build_corpus(out / "corpus", d.corpus_max_bytes, domains) if domains else {}
    tokenizer, tok_status = _ensure_tokenizer(config, corpus)
    print(f"tokenizer {tok_status}: {tokenizer_path(config)} (base {tokenizer.base_vocab_size} + "
          f"{tokenizer.num_tokens - tokenizer.base_vocab_size} special, {tokenizer.vocab_size} rows)",
          file=sys.stderr)
    drops = _dedup(config, corpus) if d.dedup != "none" else {}
    if num_shards == 1:  # this process writes the report: its plot's imports overlap the tokenizing
        import_plotting_in_background()
    report = {"tokenizer": tok_status, "datasets": {}}
    tokens = 0
    metas = {}
    for name, ds in d.datasets.items():
        drop, drop_fp, counts = drops.get(name, (None, None, None))
        result = prepare_dataset(name, _resolve_inputs(config, ds.inputs, corpus), tokenizer, out / name,
                                 workers=workers or d.workers, force=force, shard_index=shard_index,
                                 num_shards=num_shards, drop=drop, drop_fingerprint=drop_fp, dedup_counts=counts,
                                 **_dataset_kwargs(config, name))
        report["datasets"][name] = {"status": result.status, "tokens": result.meta.get("tokens", 0)}
        if result.status == "built":
            tokens += result.meta["tokens"]
        if result.status == "skipped":
            print(f"prepared {name}: unchanged, skipped", file=sys.stderr)
        if result.status == "partial":
            print(f"prepared {name}: this process's shards done; {len(result.meta['shards_missing'])} of "
                  f"{result.meta['shards']} shards still to do by the other --shard-index processes",
                  file=sys.stderr)
        else:
            metas[name] = result.meta
    if len(metas) == len(d.datasets):
        paths = write_report(out, metas)
        print(f"report: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    seconds = time.perf_counter() - start
    print(f"prepare done in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s over new datasets)",
          file=sys.stderr)
    return report


def _dedup(config: Config, corpus: dict[str, Path]) -> dict:
    """{dataset: (drop set, drop fingerprint)} from one dedup pass over every dataset of the blend."""
    from .dedup import dedup_datasets

    d = config.data
    specs = {name: (_resolve_inputs(config, ds.inputs, corpus), _dataset_kwargs(config, name))
             for name, ds in d.datasets.items()}
    return dedup_datasets(specs, data_dir(config) / "dedup", near=d.dedup == "near", threshold=d.dedup_threshold,
                          ngram=d.dedup_ngram, workers=d.workers)


def stale_reason(config: Config, name: str, meta: dict) -> str | None:
    """Why dataset `name`'s prepared data no longer matches the config (inputs, field, filters...), or None."""
    from .prepare import DEFAULT_EXTENSIONS, Options
    from .readers import expand_inputs
    from .shards import changed_files, stat_listing

    kw = _dataset_kwargs(config, name)
    corpus = {dom: data_dir(config) / "corpus" / f"{dom}.jsonl" for dom in _corpus_domains(config)}
    want = Options(kw["text_field"], {k: tuple(v) for k, v in kw["filters"].items()}, kw["valid_fraction"],
                   extensions=DEFAULT_EXTENSIONS, shard_bytes=kw["shard_bytes"]).as_dict()
    have = dict(meta.get("options", {}))
    if (have.get("drop") is None) != (config.data.dedup == "none"):
        return f"data.dedup is now {config.data.dedup!r}"
    for key in sorted(set(want) | set(have) - {"drop"}):
        if key != "drop" and want.get(key) != have.get(key):
            return f"{key} changed ({have.get(key)!r} -> {want.get(key)!r})"
    try:
        files = expand_inputs(_resolve_inputs(config, config.data.datasets[name].inputs, corpus),
                              DEFAULT_EXTENSIONS)
    except DataError as e:
        return str(e).split(";")[0]
    changes = changed_files(meta["inputs"]["files"], stat_listing(files))
    return "; ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "") if changes \
        else None


def open_streams(config: Config, split: str):
    """{dataset: TokenStream} for a split, after checking each dataset is complete, current and matches the
    tokenizer (a stale dataset stops here with one line naming it and what changed)."""
    from .prepare import check_dataset, shard_prefixes
    from .source import TokenStream

    if not tokenizer_path(config).is_file():
        raise DataError(f"tokenizer {tokenizer_path(config)} is missing; run "
                        f"`megacrystal prepare --config ...` first")
    tokenizer = CrystalTokenizer.load(tokenizer_path(config), padded_vocab_size=config.model.vocab_size)
    streams = {}
    for name, ds in config.data.datasets.items():
        prefix = data_dir(config) / name
        meta = check_dataset(prefix, tokenizer)
        reason = stale_reason(config, name, meta)
        if reason:
            raise DataError(f"dataset '{name}' is stale: {reason}; re-run `megacrystal prepare` to rebuild it")
        bins = [indexed.files(indexed.split_prefix(p, split))[1] for p in shard_prefixes(prefix, meta)]
        fp = hashlib.sha256(f"{meta['fingerprint']}:fim={ds.fim}".encode()).hexdigest()
        streams[name] = TokenStream([str(b) for b in bins], np.dtype(meta["dtype"]), config.model.seq_length,
                                    fingerprint=fp, allow_change=config.data.allow_data_change)
    return tokenizer, streams
