"""`bench --host-ceiling`: what this host gives W processes that never talk to each other.

A W-rank point on one host loses speed to two causes: its communication and synchronisation (ours to remove) and
the host itself (shared caches, memory, clocks: W busy cores run slower than one). To tell them apart, W copies of
the sweep's 1-process point run at the same time, each on 1/W of its global batch at the threads one of the W
ranks gets, with no communication at all. Their summed tokens/s is the host's ceiling for W ranks; a point's
tokens/s against it is the efficiency that parallelism itself reaches.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError
from . import sweep


def base_point(points: list[sweep.Point]) -> sweep.Point:
    """The point the copies copy: the first of the smallest, as the scaling efficiency's reference."""
    return min(points, key=lambda p: p.world_size)


def world_sizes(points: list[sweep.Point], global_batch: int, micro_batch: int, slurm: bool) -> list[int]:
    """The world sizes that get a ceiling (every multi-rank point's that fits the cores), checked before any work:
    the sweep needs a 1-process point and every such world size must split its global batch into micro-batches."""
    if slurm:
        raise ConfigError("--host-ceiling: runs copies side by side on this host; not with --slurm")
    base = base_point(points)
    if base.world_size != 1:
        raise ConfigError("--host-ceiling: the sweep needs a 1-process point to copy, e.g. --sweep 'dp=1,2'")
    micro = base.settings.get("mbs", micro_batch)
    sizes = sorted({p.world_size for p in points if 1 < p.world_size <= (os.cpu_count() or 1)})
    for size in sizes:
        if global_batch % (size * micro):
            raise ConfigError(f"--host-ceiling: train.global_batch_size {global_batch} does not split into {size} "
                              f"copies of whole micro-batches of {micro}; give a multiple of {size * micro}")
    return sizes


def copies(points: list[sweep.Point], size: int, global_batch: int) -> tuple[list[sweep.Point], list[str]]:
    """The `size` copies of the 1-process point, and the --set arguments that give each 1/size of the batch."""
    base = base_point(points)
    threads = base.settings.get("threads") or sweep.threads_per_rank(size)
    settings = {**base.settings, "threads": threads}
    return ([sweep.Point(name=f"ceiling{size}_copy{k}", settings=settings, world_size=1) for k in range(1, size + 1)],
            ["--set", f"train.global_batch_size={global_batch // size}"])


def run_copies(config_path: str, overrides: list[str], points: list[sweep.Point], size: int, global_batch: int,
               steps: int, lr: sweep.BenchLR, out: Path, phase: dict | None, round_name: str) -> list[Path]:
    """Start the copies together, wait for all; their run directories."""
    group, batch = copies(points, size, global_batch)
    started = [sweep.start_point(config_path, overrides + batch, copy, steps, lr, out, phase, round_name)
               for copy in group]
    try:
        return [sweep.finish_point(s) for s in started]
    finally:
        for s in started:  # one copy failed: stop the others instead of leaving them on the cores
            if s.process.poll() is None:
                s.process.kill()
                s.process.wait()


def measure(run_dirs: list[list[Path]], warmup: int) -> dict:
    """The ceiling from each copy's runs (one per round, pooled): summed tokens/s and each copy's measurement."""
    each = [sweep.measure(dirs, warmup) for dirs in run_dirs]
    return {"tokens_per_s": sum(m["tokens_per_s"] for m in each), "copies": each}


def summarize(rows: list[dict], ceilings: dict[int, dict]) -> None:
    """Put the ceiling against the ideal (W x the 1-process rate) into each ceiling, and each W-rank point's
    tokens/s against its ceiling into the point's row."""
    base = sweep.reference_row(rows)
    for size, ceiling in ceilings.items():
        ceiling["vs_ideal"] = ceiling["tokens_per_s"] / (size * base["tokens_per_s"])
    for row in rows:
        if row["world_size"] in ceilings:
            row["vs_host_ceiling"] = row["tokens_per_s"] / ceilings[row["world_size"]]["tokens_per_s"]


def markdown(rows: list[dict], ceilings: dict[int, dict]) -> list[str]:
    if not ceilings:
        return []
    base = sweep.reference_row(rows)
    lines = ["", f"Host ceiling (`--host-ceiling`): W copies of {base['name']} at once, each on 1/W of the global "
             "batch at one rank's threads, with no communication; their summed tokens/s is what this host gives W "
             "processes. ceiling / ideal is the host's own loss (shared caches, memory, clocks); a point / ceiling "
             "is the efficiency its parallelism reaches on top of it.", "",
             "| ranks | ceiling tokens/s (copies' step s) | ceiling / ideal | point | point / ceiling |",
             "|---|---|---|---|---|"]
    for size, ceiling in sorted(ceilings.items()):
        steps = ", ".join(f"{m['step_time_s']:.3f}" for m in ceiling["copies"])
        for row in (r for r in rows if r["world_size"] == size):
            lines.append(f"| {size} | {ceiling['tokens_per_s']:,.0f} ({steps}) | {ceiling['vs_ideal']:.2f} | "
                         f"{row['name']} | {row['vs_host_ceiling']:.2f} |")
    return lines
