"""Train every variant of a grid, one process each, one after the other; skip finished, resume half-finished ones.

A variant trains in <out>/<variant>/ with `--resume auto`, so a variant stopped half-way (killed, preempted, a
machine restart) continues from its newest checkpoint. A variant is finished when its trainer exited 0, which
writes <out>/<variant>/lab-done.json (atomically); a rerun skips it without starting a process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import ConfigError
from .grid import Grid, Variant

DONE = "lab-done.json"


def run_dir(out: Path, variant: Variant) -> Path:
    """Where a variant trains."""
    return out / variant.name


def variant_args(out: Path, grid: Grid, variant: Variant) -> list[str]:
    """The `megacrystal train` arguments of a variant (its own run and checkpoint directories)."""
    where = run_dir(out, variant).resolve()
    sets = [*variant.overrides, f"run.dir={where}", f"checkpoint.dir={where / 'checkpoints'}"]
    return ["train", "--config", str(grid.base.resolve()), *[a for s in sets for a in ("--set", s)],
            "--resume", "auto"]


def is_done(out: Path, variant: Variant) -> bool:
    """Whether the variant finished in an earlier run."""
    return (run_dir(out, variant) / DONE).is_file()


def mark_done(where: str | Path, name: str, overrides: list[str], seconds: float) -> None:
    """Record (atomically) that a variant's trainer finished; here after a local run, or by its SLURM job."""
    where = Path(where)
    tmp = where / (DONE + ".tmp")
    tmp.write_text(json.dumps({"variant": name, "overrides": overrides, "seconds": seconds}, indent=1))
    os.replace(tmp, where / DONE)


def _say(text: str) -> None:
    print(f"[ablate] {text}", flush=True)


def _prepared(config) -> bool:
    """Whether the config's tokenizer and datasets are there and match (what `megacrystal train` checks)."""
    from ..data.errors import DataError
    from ..data.pipeline import open_streams

    try:
        open_streams(config, "train")
        return True
    except DataError:
        return False


def _prepare(grid: Grid, python: str) -> None:
    """`megacrystal prepare` for each distinct data directory whose datasets are not built yet."""
    seen = set()
    for variant in grid.variants:
        c = variant.config
        if c.data.source != "indexed" or c.data.dir.format(name=c.run.name) in seen:
            continue
        seen.add(c.data.dir.format(name=c.run.name))
        if _prepared(c):
            continue
        _say(f"preparing the data of {c.data.dir.format(name=c.run.name)}")
        args = [python, "-m", "megacrystal", "prepare", "--config", str(grid.base.resolve()),
                *[a for s in variant.overrides for a in ("--set", s)]]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"variant {variant.name}: `megacrystal prepare` failed: "
                              f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")


def _train(args: list[str], log: Path, python: str) -> int:
    """Run one trainer, its output appended to `log` and echoed; SIGTERM/SIGINT are passed on to it."""
    with open(log, "a") as sink:
        child = subprocess.Popen([python, "-m", "megacrystal", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
        forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731 - the trainer checkpoints
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for line in child.stdout:
                sink.write(line)
                if line.startswith(("step ", "resumed", "checkpoint saved", "megacrystal: error")):
                    print("    " + line, end="", flush=True)
            return child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_grid(grid: Grid, out: str | Path, python: str = sys.executable) -> list[str]:
    """Train the unfinished variants; return the names of those trained by this call."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(grid, python)
    trained = []
    for i, variant in enumerate(grid.variants, 1):
        where = run_dir(out, variant)
        head = f"variant {i}/{len(grid.variants)} {variant.name}"
        if is_done(out, variant):
            _say(f"{head}: finished earlier, skipped")
            continue
        where.mkdir(parents=True, exist_ok=True)
        has_checkpoint = any((where / "checkpoints").glob("step_*"))
        _say(f"{head}: {'resuming from its checkpoints' if has_checkpoint else 'starting'} in {where}")
        started = time.perf_counter()
        rc = _train(variant_args(out, grid, variant), where / "train.log", python)
        if rc != 0:
            raise ConfigError(f"variant {variant.name}: training exited {rc}; see {where / 'train.log'} "
                              "(rerun `megacrystal ablate` to resume it)")
        seconds = time.perf_counter() - started
        mark_done(where, variant.name, list(variant.overrides), seconds)
        _say(f"{head}: done in {seconds:.0f}s")
        trained.append(variant.name)
    return trained
