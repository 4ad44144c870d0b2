"""Run a sweep of parallel layouts locally (one torchrun per point) and measure each from its metrics.jsonl."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..train.records import read_records

# sweep key -> the --set overrides it becomes (dp is what the world size leaves, so it sets the world size).
_KEYS = {
    "nodes": None, "dp": None,
    "tp": "parallel.tp", "pp": "parallel.pp", "vpp": "parallel.vpp", "sp": "parallel.sp",
    "mbs": "train.micro_batch_size", "precision": "train.precision", "engine": "engine",
    "zero": "deepspeed.zero_stage", "threads": "train.threads", "compile": "train.compile",
}
LOSS_TAIL_STEPS = 10  # the loss a report compares is the mean over a point's last 10 steps


@dataclass
class Point:
    """One configuration of the sweep and what was measured for it."""

    name: str
    settings: dict
    world_size: int
    measured: dict = field(default_factory=dict)


def parse_sweep(spec: str) -> list[dict]:
    """'tp=1,2;pp=1,2;mbs=1,4' -> the cartesian product as a list of {key: value} (values parsed as ints if they can be)."""
    axes = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS or not values.strip():
            raise ConfigError(f"--sweep {part!r}: expected key=v1,v2 with key one of {', '.join(_KEYS)}")
        axes.append([(key, _value(v.strip())) for v in values.split(",")])
    if not axes:
        raise ConfigError("--sweep: empty; e.g. --sweep 'dp=1,2;tp=1,2'")
    return [dict(combo) for combo in itertools.product(*axes)]


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        return {"true": True, "false": False}.get(text.lower(), text)


def plan_points(settings_list: list[dict], procs_per_node: int | None = None) -> list[Point]:
    """The points of a sweep; with `procs_per_node` (--slurm) a point's world size is nodes x procs_per_node."""
    points = []
    for settings in settings_list:
        nodes = settings.get("nodes", 1)
        if not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"--sweep nodes={nodes}: give whole numbers of nodes, e.g. nodes=1,2,4")
        if procs_per_node is None and nodes != 1:
            raise ConfigError("--sweep nodes>1 needs SLURM (--slurm); locally every point runs on this machine")
        if procs_per_node is not None and "dp" in settings:
            raise ConfigError("--sweep dp: with --slurm the data-parallel size is what nodes x processes per node "
                              "leaves after tp x pp; sweep nodes instead")
        world = nodes * procs_per_node if procs_per_node else \
            settings.get("dp", 1) * settings.get("tp", 1) * settings.get("pp", 1)
        name = "_".join(f"{k}{v}" for k, v in settings.items())
        points.append(Point(name=name, settings=settings, world_size=world))
    return points


@dataclass(frozen=True)
class BenchLR:
    """The points' learning rate: the config's first warmup up to its first peak, which is then held (a run's
    start). Not the peak from step 1: measured at the small shape, that cold start made bf16 runs spike (grad norm
    9-12 at step 13 or 15, where fp32 stayed below 1), and the bf16 against fp32 loss after 50 steps then
    measured the spike (+2%), not the precision (-0.2% with the warmup)."""

    peak: float
    warmup_steps: int

    @classmethod
    def of(cls, config) -> "BenchLR":
        if config.optim.lr:  # one LR segment for the whole run (no phases)
            return cls(config.optim.lr, config.optim.warmup_steps)
        first = next(iter(config.data.phases.values())).lr
        return cls(first.peak, first.warmup_steps)


def data_phase(config, steps: int, lr: BenchLR) -> dict:
    """One phase of exactly `steps` steps on the config's own datasets (`bench --data config`): the blend and FIM
    rate of its phase with the most datasets (the costliest data path), at `lr`."""
    if config.data.source != "indexed" or not config.data.phases:
        raise ConfigError("--data config: the config has no indexed datasets and phases to read; use --data "
                          "synthetic or a config with data.source: indexed")
    widest = max(config.data.phases.values(), key=lambda phase: len(phase.weights))
    tokens = steps * config.train.global_batch_size * config.model.seq_length
    return {"tokens": tokens, "weights": widest.weights, "fim_rate": widest.fim_rate,
            "lr": {"peak": lr.peak, "warmup_steps": lr.warmup_steps, "end": lr.peak}}


def train_tokens_sha256(config, phase: dict) -> dict[str, str]:
    """The sha256 of each blended dataset's prepared train tokens, so that reports on different data tell
    themselves apart: the embedded corpus is built from the Python installation, a changed one changes it."""
    from ..data.pipeline import data_dir
    from ..data.prepare import train_bins

    digests = {}
    for name in phase["weights"]:
        h = hashlib.sha256()  # over the shards in order: one shard's digest is its file's
        for bin_path in train_bins(data_dir(config) / name):
            with bin_path.open("rb") as tokens:
                for block in iter(lambda: tokens.read(1 << 20), b""):
                    h.update(block)
        digests[name] = h.hexdigest()
    return digests


def overrides_for(point: Point, steps: int, lr: BenchLR, phase: dict | None = None) -> list[str]:
    """--set arguments of a point: its layout for `steps` steps at `lr` on the synthetic stream (or, given a
    `data_phase`, on the config's datasets), saving nothing but the final checkpoint (after the timed steps)."""
    sets = [f"{_KEYS[k]}={v}" for k, v in point.settings.items() if _KEYS.get(k)]
    if phase:
        sets += [f"data.phases={json.dumps({'bench': phase})}", "data.eval_interval=null"]
    else:
        sets += ["data.source=synthetic", "data.phases={}", f"train.steps={steps}"]
    sets += [f"optim.lr={lr.peak}", f"optim.warmup_steps={lr.warmup_steps}", f"optim.end_lr={lr.peak}",
             "checkpoint.interval=null", "checkpoint.phase_end=false",
             "train.log_interval=1000000"]
    return [a for s in sets for a in ("--set", s)]


def reference_row(rows: list[dict]) -> dict:
    """The report row that scaling efficiency, the ideal line and the host ceiling are set against: the point
    report.summarize named `baseline_point` (the first of the smallest)."""
    return next(row for row in rows if row["name"] == rows[0]["baseline_point"])


def threads_per_rank(ranks_on_host: int) -> int:
    """The CPU threads each of `ranks_on_host` ranks gets when the point does not set `threads`."""
    return max(1, (os.cpu_count() or 1) // ranks_on_host)


@dataclass
class Started:
    """A point's training process(es), running."""

    point: Point
    run_dir: Path
    process: subprocess.Popen
    log: Path


def start_point(config_path: str, base_overrides: list[str], point: Point, steps: int, lr: BenchLR, out: Path,
                phase: dict | None = None, round_name: str = "") -> Started:
    """Start one point with torchrun (or one process) in `out`/points/<name>[/<round_name>], its output in a .log
    file beside that directory."""
    run_dir = out / "points" / point.name / round_name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(point.world_size),
           "-m", "megacrystal", "train"] if point.world_size > 1 else [sys.executable, "-m", "megacrystal", "train"]
    cmd += ["--config", config_path, "--resume", "none", *base_overrides, *overrides_for(point, steps, lr, phase),
            "--set", f"run.dir={run_dir}", "--set", f"checkpoint.dir={run_dir}/checkpoints"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(point.world_size))}
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        process = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
    return Started(point, run_dir, process, log)


def finish_point(started: Started) -> Path:
    """Wait for a started point; return its run directory, or raise with the last line it printed."""
    code = started.process.wait()
    if code != 0:
        tail = started.log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"bench point {started.point.name} failed (exit {code}): {tail[0]} (log: {started.log})")
    return started.run_dir


def run_point(config_path: str, base_overrides: list[str], point: Point, steps: int, lr: BenchLR, out: Path,
              phase: dict | None = None, round_name: str = "") -> Path:
    """Run one point to the end; return its run directory."""
    return finish_point(start_point(config_path, base_overrides, point, steps, lr, out, phase, round_name))


def measure(run_dirs: list[Path], warmup: int) -> dict:
    """Step-time statistics after `warmup` steps, from the metrics.jsonl of one point's runs (one per round),
    their timed steps pooled."""
    runs = [read_records(d) for d in run_dirs]
    for run_dir, run in zip(run_dirs, runs):
        if len(run) - warmup < 3:
            raise ConfigError(f"{run_dir}: only {len(run) - warmup} steps after warm-up; raise --steps")
    records, timed = runs[0], [r for run in runs for r in run[warmup:]]
    times = sorted(r.step_time_s for r in timed)
    tokens = records[0].tokens  # cumulative after the first step = tokens per step
    median = statistics.median(times)
    log_median = statistics.median(r.log_time_s for r in timed)
    return {
        "steps_timed": len(timed),
        "round_step_times_s": [statistics.median(r.step_time_s for r in run[warmup:]) for run in runs],
        "first_step_s": records[0].step_time_s,  # includes torch.compile's compile (or cache load) time
        "step_time_s": median,
        "step_time_p10_s": times[len(times) // 10],
        "step_time_p90_s": times[min(len(times) - 1, (9 * len(times)) // 10)],
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        # the first round's losses: every round trains the same steps on the same batches
        "loss_last": records[-1].loss,
        "loss_tail_mean": statistics.fmean(r.loss for r in records[-LOSS_TAIL_STEPS:]),
        "loss_tail_steps": min(LOSS_TAIL_STEPS, len(records)),
        "memory_mb": max((r.memory_mb or 0) for run in runs for r in run) or None,
        # data loading (inside the step) and metrics/progress writing (between steps), as a share of the step
        "data_and_log_share": (statistics.median(r.data_time_s for r in timed) + log_median) / (median + log_median),
    }


def as_dict(point: Point) -> dict:
    return asdict(point)
