"""`megacrystal bench-prepare`: `megacrystal prepare` against Megatron-LM's tools/preprocess_data.py and against
sentencepiece's own in-memory multi-thread encode (the limit), on the same JSONL, tokenizer and workers.

Sides run as separate processes, alternated round by round (a host whose speed drifts moves all sides alike);
the best round of each counts. Several inputs (e.g. one corpus at 142 MB and 1 GB) each get their report under
--out/<n>-<size>mb/, and one summary at --out compares them, peak memory growth included. Each side's wall time
includes its start-up (imports), as a user sees it; peak memory is the largest summed RSS of the side's process
tree, sampled every 50 ms.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ..config.arguments import positive_float, positive_int, positive_ints
from ..data.errors import DataError

# Megatron-LM's training package imports a Triton kernel module that CPU machines cannot import; preprocessing
# never runs it, so the runner puts a stand-in for that one module in sys.modules and runs the tool unchanged.
LIST_ENCODE_BYTES_PER_BYTE = 14  # sentencepiece's ids as Python int lists, per byte of JSONL input (measured)

_MEGATRON_RUNNER = textwrap.dedent("""
    import runpy, sys, types
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *a, **k: None
    stub.is_batch_invariant_mode_enabled = lambda *a, **k: False
    sys.modules[stub.__name__] = stub
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")

_SPM_LIMIT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    texts = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8") if l.strip()]
    texts = [t for t in texts if t.strip()]
    start = time.perf_counter()
    ids = sp.encode(texts, return_type=int if sys.argv[4] == "int" else "numpy", num_threads=int(sys.argv[3]))
    seconds = time.perf_counter() - start
    from megacrystal.bench.prepare_bench import ids_digest
    digest = ids_digest(np.append(a, sp.eos_id()) for a in ids)
    print(json.dumps({"seconds": seconds, "tokens": sum(map(len, ids)) + len(ids), "documents": len(ids),
                      "ids_digest": digest}))
""")


def _ours_config(path: Path, model: Path, input_jsonl: Path, data_dir: Path, workers: int, dedup: str) -> Path:
    """A config whose one dataset is the input, for `megacrystal prepare --config` (crystal-tiny's model)."""
    import yaml

    from ..data.tokenizer import CrystalTokenizer

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "crystal-tiny.yaml").read_text())
    raw["model"]["vocab_size"] = CrystalTokenizer.load(model).vocab_size
    raw["data"] = {"source": "indexed", "dir": str(data_dir), "tokenizer": {"model": str(model)},
                   "workers": workers, "dedup": dedup, "datasets": {"bench": {"inputs": [str(input_jsonl)]}},
                   "phases": {"one": {"tokens": 4096, "weights": {"bench": 1.0}, "lr": {"peak": 0.01}}}}
    path.write_text(yaml.safe_dump(raw))
    return path


def _peak_rss_run(cmd: list[str], env: dict, cwd: str | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak summed RSS of the process tree in bytes, stdout) of one command."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [parent] + parent.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise DataError(f"benchmark side `{' '.join(cmd[:4])} ...` failed ({proc.returncode}): "
                        f"{err.strip().splitlines()[-1] if err.strip() else 'no output'}")
    return seconds, peak, out


def ids_digest(documents) -> str:
    """An order-free digest of documents' token ids (EOS included): the sum of each document's hash, so sides
    that store documents in another order (ours splits train/valid) compare, repeated documents included."""
    import hashlib

    import numpy as np

    total = sum(int.from_bytes(hashlib.blake2b(np.asarray(ids, np.int64).tobytes(), digest_size=8).digest(),
                               "little") for ids in documents)
    return f"{total % 2**64:016x}"


def _shard_documents(prefixes: list[str]):
    """Every document's ids in megatron `.bin/.idx` pairs, one array each."""
    import numpy as np

    from ..data.indexed import files, read_index

    for prefix in prefixes:
        dtype, lengths = read_index(prefix)
        if lengths.size:
            tokens = np.memmap(files(prefix)[1], dtype, mode="r")
            yield from np.split(tokens, np.cumsum(lengths.astype(np.int64))[:-1])


def _split_prefixes(prefix: Path, meta: dict) -> list[str]:
    from ..data.indexed import SPLITS, split_prefix
    from ..data.prepare import shard_prefixes

    return [split_prefix(p, s) for p in shard_prefixes(prefix, meta) for s in SPLITS]


def _tokens_and_digest(prefixes: list[str]) -> dict:
    import numpy as np

    from ..data.indexed import read_index

    return {"tokens": sum(int(read_index(p)[1].astype(np.int64).sum()) for p in prefixes),
            "ids_digest": ids_digest(_shard_documents(prefixes))}


def run(input_jsonl: Path, model: Path, out: Path, workers: int, rounds: int, megatron: Path | None,
        dedup: str, skip: tuple[str, ...] = ()) -> dict:
    """Run the sides `rounds` times alternated and write the report; return it."""
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                    os.environ.get("PYTHONPATH")])))
    py = sys.executable
    sides = {
        # Both output types of the same encode: Python int lists (as Megatron and most tools use it) and numpy
        # buffers (what we use); the faster one is the limit.
        "sentencepiece": [py, "-c", _SPM_LIMIT, str(model), str(input_jsonl), str(workers), "int"],
        "sentencepiece-numpy": [py, "-c", _SPM_LIMIT, str(model), str(input_jsonl), str(workers), "numpy"],
    }
    # Ours is the command a user runs, start-up, report and plot included; every round rebuilds (--force) and
    # the dedup side also redoes its dedup pass (its directory is removed before each round).
    ours = {"megacrystal": ("ours", "none")} | ({f"megacrystal+dedup-{dedup}": ("dedup", dedup)}
                                                 if dedup != "none" else {})
    for name, (sub, _) in ours.items():
        sides[name] = [py, "-m", "megacrystal", "prepare", "--config", str(work / f"{sub}.yaml"), "--force"]
    if megatron is not None:
        tool = megatron / "tools" / "preprocess_data.py"
        if not tool.is_file():
            raise DataError(f"--megatron {megatron}: no tools/preprocess_data.py; point it at a Megatron-LM tree")
        sides["megatron-lm"] = [py, "-c", _MEGATRON_RUNNER, str(tool), "--input", str(input_jsonl),
                                "--output-prefix", str(work / "megatron" / "bench"), "--tokenizer-type",
                                "SentencePieceTokenizer", "--tokenizer-model", str(model), "--workers",
                                str(workers), "--append-eod", "--log-interval", "1000000"]
    unknown = (set(skip) - set(sides)) | ({"megacrystal"} & set(skip))
    if unknown:
        raise DataError(f"--skip {','.join(sorted(unknown))}: not a side to skip (sides: {', '.join(sides)}; "
                        f"megacrystal always runs)")
    notes = {}
    need, free = LIST_ENCODE_BYTES_PER_BYTE * input_jsonl.stat().st_size, _available_memory()
    if "sentencepiece" not in skip and need > free:
        skip = (*skip, "sentencepiece")
        notes["sentencepiece"] = (f"not run: its Python int lists need ~{need / 1e9:.0f} GB, {free / 1e9:.0f} GB "
                                  f"is available")
    sides = {name: cmd for name, cmd in sides.items() if name not in skip}
    (work / "megatron").mkdir(parents=True, exist_ok=True)
    for name, (sub, mode) in ours.items():
        if name in sides:
            (work / sub).mkdir(parents=True, exist_ok=True)
            _ours_config(work / f"{sub}.yaml", model, input_jsonl, work / sub, workers, mode)
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, cmd in (sides.items() if r % 2 == 0 else reversed(list(sides.items()))):
            env_side = dict(env, PYTHONPATH=f"{megatron}{os.pathsep}{env['PYTHONPATH']}") if name == "megatron-lm" \
                else env
            if name in ours:
                shutil.rmtree(work / ours[name][0] / "dedup", ignore_errors=True)
            seconds, peak, stdout = _peak_rss_run(cmd, env_side)
            row = {"round": r, "seconds": round(seconds, 3), "peak_rss_mb": round(peak / 2**20, 1)}
            if name == "megatron-lm":
                row.update(_tokens_and_digest([str(work / "megatron" / "bench_text_document")]))
            elif name in ours:
                meta = json.loads((work / ours[name][0] / "bench.meta.json").read_text())
                row.update({k: meta[k] for k in ("documents", "duplicates_removed")})
                row.update(_tokens_and_digest(_split_prefixes(work / ours[name][0] / "bench", meta)))
            else:
                measured = json.loads(stdout.strip().splitlines()[-1])
                if name.startswith("sentencepiece"):  # wall time includes reading the texts; the limit is the encode
                    row["encode_seconds"] = round(measured.pop("seconds"), 3)
                row.update(measured)
            results[name].append(row)
            print(f"round {r} {name}: {row}", file=sys.stderr, flush=True)
    return _report(out, input_jsonl, model, workers, rounds, results, notes)


def _available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def _per_round_ratio(results: dict, rounds: int) -> list[float]:
    """Each round's limit (the faster sentencepiece encode of that round) over megacrystal's time that round."""
    out = []
    for r in range(rounds):
        limit = min(rows[r]["encode_seconds"] for name, rows in results.items() if name.startswith("sentencepiece"))
        out.append(round(limit / results["megacrystal"][r]["seconds"], 3))
    return out


def _report(out: Path, input_jsonl: Path, model: Path, workers: int, rounds: int, results: dict,
            notes: dict) -> dict:
    mb = input_jsonl.stat().st_size / 1e6
    best = {}
    for name, rows in results.items():
        key = "encode_seconds" if name.startswith("sentencepiece") else "seconds"
        row = min(rows, key=lambda r: r[key] if key in r else r["seconds"])
        seconds = row.get(key, row["seconds"])
        best[name] = {"seconds": seconds, "mb_per_s": round(mb / seconds, 3),
                      "mb_per_s_per_core": round(mb / seconds / workers, 3), "tokens": row["tokens"],
                      "ids_digest": row["ids_digest"],
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}
    limits = [b["seconds"] for n, b in best.items() if n.startswith("sentencepiece")]
    limit = min(limits) if limits else float("nan")
    for name, b in best.items():
        b["of_sentencepiece_limit"] = round(limit / b["seconds"], 3)
        if "megatron-lm" in best:
            b["vs_megatron"] = round(best["megatron-lm"]["seconds"] / b["seconds"], 3)
    report = {"input": str(input_jsonl), "input_mb": round(mb, 2), "tokenizer": str(model), "workers": workers,
              "rounds": rounds, "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "best": best, "runs": results, "notes": notes,
              "of_sentencepiece_limit_per_round": _per_round_ratio(results, rounds) if limits else [],
              "identical_token_counts": len({b["tokens"] for n, b in best.items() if "dedup" not in n}) == 1,
              "identical_token_ids": len({r["ids_digest"] for n, rows in results.items() if "dedup" not in n
                                          for r in rows}) == 1}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# prepare benchmark: {mb:.1f} MB JSONL, {workers} workers, best of {rounds} alternated rounds", "",
             "| side | seconds | MB/s | MB/s per core | of sentencepiece limit | vs Megatron-LM | tokens | "
             "peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, b in best.items():
        lines.append(f"| {name} | {b['seconds']:.2f} | {b['mb_per_s']:.2f} | {b['mb_per_s_per_core']:.2f} | "
                     f"{b['of_sentencepiece_limit']:.2f} | {b.get('vs_megatron', float('nan')):.2f} | "
                     f"{b['tokens']:,} | {b['peak_rss_mb']:.0f} |")
    lines += ["", f"Identical token counts (without dedup): {report['identical_token_counts']}; identical token "
              f"ids (an order-free digest of every document's ids, every round): "
              f"{report['identical_token_ids']}. The "
              "sentencepiece rows time only `encode(texts, num_threads=workers)` of texts already in memory (ids "
              "as Python lists, and as numpy buffers); the limit is the faster of the two. The other rows are "
              "whole processes as a user runs them (start-up, reading, parsing, writing; ours is `megacrystal "
              "prepare --config` with its report and plot)."]
    lines += [f"{name}: {note}." for name, note in notes.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(out / "prepare.png", best)
    return report


def run_inputs(inputs: list[Path], model: Path, out: Path, workers: int, rounds: int, megatron: Path | None,
               dedup: str, skip: tuple[str, ...] = (), note: str = "") -> dict:
    """run() on each input (its report under out/<n>-<size>mb), then one summary over them: out/report.{md,json}."""
    reports = []
    for i, path in enumerate(inputs):
        label = f"{i + 1}-{path.stat().st_size / 1e6:.0f}mb"
        reports.append(dict(run(path, model, out / label, workers, rounds, megatron, dedup, skip), label=label))
    return _summary(out, reports, note)


def _summary(out: Path, reports: list[dict], note: str = "") -> dict:
    rows = []
    for rep in reports:
        best = rep["best"]
        ours = best["megacrystal"]
        dedup = next((b for n, b in best.items() if "dedup" in n), None)
        rows.append({"input_mb": rep["input_mb"], "megacrystal_seconds": ours["seconds"],
                     "of_sentencepiece_limit": ours["of_sentencepiece_limit"],
                     "of_limit_per_round": rep["of_sentencepiece_limit_per_round"],
                     "vs_list_encode": round(best["sentencepiece"]["seconds"] / ours["seconds"], 3)
                     if "sentencepiece" in best else None,
                     "vs_megatron": ours.get("vs_megatron"), "identical_token_counts": rep["identical_token_counts"],
                     "identical_token_ids": rep["identical_token_ids"],
                     "peak_rss_mb": ours["peak_rss_mb"], "dedup_mb_per_s": dedup["mb_per_s"] if dedup else None})
    growth = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1, 3) if len(rows) > 1 else None
    summary = {"workers": reports[0]["workers"], "rounds": reports[0]["rounds"], "rows": rows,
               "peak_rss_growth": growth, "inputs": [r["input"] for r in reports], "note": note}
    (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"# prepare benchmark: {len(rows)} input(s), {summary['workers']} workers, best of "
             f"{summary['rounds']} alternated rounds", "",
             "| input MB | megacrystal s | of sentencepiece limit (per round) | vs list encode | vs Megatron-LM | "
             "identical token counts / ids | peak RSS MB | with dedup MB/s |",
             "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['input_mb']:,.1f} | {r['megacrystal_seconds']:.2f} | {r['of_sentencepiece_limit']:.3f} "
                     f"({' / '.join(f'{x:.3f}' for x in r['of_limit_per_round'])}) | "
                     f"{num(r['vs_list_encode'], '.2f')} | {num(r['vs_megatron'], '.2f')} | "
                     f"{r['identical_token_counts']} / {r['identical_token_ids']} | {r['peak_rss_mb']:.0f} | "
                     f"{num(r['dedup_mb_per_s'], '.2f')} |")
    if growth is not None:
        lines += ["", f"Peak RSS of `megacrystal prepare` from {rows[0]['input_mb']:,.0f} MB to "
                      f"{rows[-1]['input_mb']:,.0f} MB of input: {rows[0]['peak_rss_mb']:.0f} -> "
                      f"{rows[-1]['peak_rss_mb']:.0f} MB ({growth:+.1%})."]
    if note:
        lines += ["", note]
    for rep in reports:
        sub = out / rep["label"]
        lines += ["", f"## {rep['input_mb']:,.1f} MB ({sub.name}/)", ""]
        lines += (sub / "report.md").read_text().splitlines()[2:]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def _plot(path: Path, best: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(best)
    ax.barh(names, [best[n]["mb_per_s"] for n in names], color="tab:blue")
    ax.set_xlabel("MB/s of JSONL input (best round)")
    ax.set_title("prepare throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def python_sources_jsonl(path: Path, max_bytes: int, repeat: int = 1) -> Path:
    """A JSONL of this machine's Python sources (real code: the standard library, then the installed packages, in
    sorted order), one non-blank file a document, until max_bytes of UTF-8 text; the whole of it `repeat` times
    (a larger input of the same documents). The benchmarks in docs/benchmarks/ name their arguments."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib")]
    total = 0
    lines = []
    for root in roots:
        for src in sorted(root.rglob("*.py")):
            try:
                text = src.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            lines.append(json.dumps({"text": text}) + "\n")
            total += len(text.encode())
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(repeat):
            fh.writelines(lines)
    return path


def register(subparsers) -> None:
    """Add `megacrystal bench-prepare`."""
    p = subparsers.add_parser("bench-prepare", help="benchmark prepare against Megatron-LM's preprocess_data.py "
                                                    "and sentencepiece's in-memory encode")
    p.add_argument("--input", action="append", default=[],
                   help="JSONL with a `text` field; repeat for several sizes (default: this machine's Python "
                        "sources, --mb MB)")
    p.add_argument("--mb", type=positive_float, default=20.0, help="text in the default input in MB (default 20)")
    p.add_argument("--repeat", type=positive_ints, default=[1], metavar="K[,K...]",
                   help="one default input per K, the --mb text written K times over (e.g. 1,7 for 142 MB and "
                        "1 GB from --mb 142)")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: train a --vocab BPE on the input)")
    p.add_argument("--vocab", type=positive_int, default=32000, help="pieces of the default tokenizer (32000)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--megatron", help="a Megatron-LM source tree (with tools/preprocess_data.py; needs six, regex)")
    p.add_argument("--dedup", choices=("none", "exact", "near"), default="near",
                   help="also run ours with this dedup (default near)")
    p.add_argument("--skip", default="", help="comma-separated sides not to run (e.g. sentencepiece, whose "
                                               "Python int lists need ~14x the input in memory)")
    p.add_argument("--out", default="docs/benchmarks/bench-prepare")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    p.set_defaults(handler=_main)


def _main(args) -> int:
    for flag in ("workers", "rounds", "mb"):
        if getattr(args, flag) <= 0:
            raise DataError(f"--{flag} {getattr(args, flag)}: give a positive number")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = [Path(p) for p in args.input]
    for path in inputs:
        if not path.is_file():
            raise DataError(f"--input {path} does not exist")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise DataError(f"--tokenizer {args.tokenizer} does not exist")
    generated = [] if inputs else [python_sources_jsonl(out / f"input-x{k}.jsonl", int(args.mb * 1e6), k)
                                   for k in args.repeat]
    inputs = inputs or generated
    if args.tokenizer:
        model = Path(args.tokenizer)
    else:
        from ..data.tokenizer import train_tokenizer

        model = train_tokenizer([inputs[0]], out / "tokenizer", args.vocab, max_sentences=1_000_000, num_threads=2)
    note = " ".join(filter(None, [
        f"Inputs built by the command from this machine's Python sources (--mb {args.mb:g} --repeat "
        f"{','.join(map(str, args.repeat))}) and deleted after the run." if generated else "",
        "" if args.tokenizer else f"Tokenizer: a {args.vocab:,}-piece BPE the command trained on the first input "
                                  f"(deleted after the run; the same arguments train it again byte for byte)."]))
    report = run_inputs(inputs, model, out, args.workers, args.rounds, Path(args.megatron) if args.megatron else None,
                        args.dedup, tuple(filter(None, args.skip.split(","))), note)
    for sub in out.glob("*-*mb/work"):
        shutil.rmtree(sub, ignore_errors=True)
    for path in generated + ([] if args.tokenizer else [model]):
        path.unlink()
    print((out / "report.md").read_text())
    return 0 if report else 1
