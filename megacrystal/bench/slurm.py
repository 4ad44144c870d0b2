"""`megacrystal bench --slurm`: every sweep point as one SLURM job, rendered by the code of `megacrystal launch
slurm`, submitted together and waited for; the caller measures the points from their metrics.jsonl."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, load_config
from ..launch.slurm import SlurmJob, render, resolve, submit
from ..train.records import metrics_path
from .sweep import BenchLR, Point, overrides_for

# States after which a job runs no more (squeue/sacct spelling); every other state is still on its way.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}
POLL_S = 5.0          # one squeue for all jobs this often: light on the controller, prompt for minute-long jobs
PROGRESS_S = 60.0     # a progress line whenever a job changes state, and at least this often
CONTROLLER_GRACE_S = 300.0  # give up when squeue has failed for this long (controller unreachable)


@dataclass
class PointJob:
    """One sweep point as a resolved SLURM job, and its id once submitted."""

    point: Point
    job: SlurmJob
    run_dir: Path
    job_id: str = ""
    state: str = "SUBMITTING"  # the last state seen (squeue/sacct spelling), ENDED once SLURM forgot the job

    @property
    def log(self) -> Path:
        return Path(self.job.log_dir) / f"{self.job.job_name}-{self.job_id}.out"


def procs_per_node(args) -> int | None:
    """Trainer processes per node with --slurm (None without it); checks the SLURM options before any job exists."""
    options = (("--gpus-per-node", args.gpus_per_node), ("--cpus-per-node", args.cpus_per_node),
               ("--partition", args.partition), ("--account", args.account), ("--time", args.time),
               ("--sbatch", args.sbatch_extra))
    given = [flag for flag, value in options if value not in (None, [])]
    if not args.slurm:
        if given:
            raise ConfigError(f"bench {given[0]}: a SLURM option; add --slurm to run the points as SLURM jobs")
        return None
    if args.gpus_per_node is None or args.gpus_per_node < 0:
        raise ConfigError("bench --slurm: give --gpus-per-node (trainer processes per node), or --gpus-per-node 0 "
                          "--cpus-per-node N for N processes per CPU node")
    if args.gpus_per_node == 0 and not args.cpus_per_node:
        raise ConfigError("bench --slurm --gpus-per-node 0: give --cpus-per-node N, the trainer processes per CPU "
                          "node (the report needs every point's world size before the jobs start)")
    if args.gpus_per_node and args.device not in _device_names():
        raise ConfigError(f"bench --device {args.device!r}: the nodes' GPU, for MFU; choose one of "
                          f"{', '.join(_device_names())}")
    limit = _seconds(args.time)
    if limit is not None and limit <= SlurmJob.signal_before:
        raise ConfigError(f"bench --time {args.time}: a job is told to checkpoint and requeue "
                          f"{SlurmJob.signal_before} s before its limit; give more than that, e.g. --time 30")
    return args.gpus_per_node or args.cpus_per_node


def _seconds(limit: str | None) -> int | None:
    """A SLURM time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None if absent, unlimited or unparsed
    (sbatch --test-only then judges it)."""
    days, _, clock = (limit or "").rpartition("-")
    parts = clock.split(":")
    if not limit or not all(p.isdigit() for p in [*parts, *([days] if days else [])]) or len(parts) > 3:
        return None
    numbers = [int(p) for p in parts]
    if days:  # D-H[:M[:S]]
        numbers += [0] * (3 - len(numbers))
        return int(days) * 86400 + numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(numbers)]  # M, M:S, H:M:S
    return sum(n * u for n, u in zip(numbers, units))


def _device_names() -> list[str]:
    from .peaks import DEVICE_PEAKS_TFLOPS

    return list(DEVICE_PEAKS_TFLOPS)


def plan_jobs(args, points: list[Point], lr: BenchLR, out: Path, phase: dict | None = None) -> list[PointJob]:
    """Every point's job, validated (config, layout, SLURM values) before anything is written or submitted."""
    per_node = procs_per_node(args)
    jobs = []
    for point in points:
        run_dir = (out / "points" / point.name).resolve()
        overrides = [*args.overrides, *overrides_for(point, args.steps, lr, phase)[1::2],  # drop the "--set" words
                     f"run.dir={run_dir}", f"checkpoint.dir={run_dir}/checkpoints"]
        nodes = point.settings.get("nodes", 1)
        _check_layout(args.config, overrides, point, nodes, per_node)
        try:
            job = resolve(SlurmJob(
                config=args.config, nodes=nodes, gpus_per_node=args.gpus_per_node, overrides=overrides,
                cpus_per_node=args.cpus_per_node, partition=args.partition, time=args.time, account=args.account,
                job_name=f"bench-{point.name}", sbatch_extra=list(args.sbatch_extra)))
        except ConfigError as err:
            raise ConfigError(f"bench point {point.name}: {err}") from None
        jobs.append(PointJob(point, job, run_dir))
    return jobs


def _check_layout(config_path: str, overrides: list[str], point: Point, nodes: int, per_node: int) -> None:
    """nodes x processes per node must hold whole tp x pp groups; say which nodes would."""
    try:
        parallel = load_config(config_path, overrides).parallel
    except ConfigError as err:
        raise ConfigError(f"bench point {point.name}: {err}") from None
    group = parallel.tp * parallel.pp
    if (nodes * per_node) % group:
        step = group // math.gcd(group, per_node)
        raise ConfigError(f"bench point {point.name}: {nodes} node(s) x {per_node} processes = {nodes * per_node} "
                          f"ranks do not divide into tp x pp = {group}; sweep nodes in multiples of {step}, or "
                          f"change tp/pp or the processes per node")


def run_jobs(jobs: list[PointJob], command: str) -> None:
    """Check every job with the controller, submit them all, and wait until all have finished and written their
    metrics. A failed job cancels the others (the report needs every point) and raises one line."""
    scripts = [render(j.job, f"{command}  # point {j.point.name}") for j in jobs]
    for j, script in zip(jobs, scripts):
        _test_only(j, script)  # a request the cluster cannot run fails now, before anything is queued
    for j in jobs:
        shutil.rmtree(j.run_dir, ignore_errors=True)  # the jobs resume (--resume auto): no earlier run of the point
    try:
        for j, script in zip(jobs, scripts):
            j.job_id = submit(j.job, script)
        _wait(jobs)
    except BaseException:
        _cancel(jobs)
        raise


def _test_only(j: PointJob, script: str) -> None:
    """`sbatch --test-only`: the controller validates the request (nodes, partition, account) without queueing."""
    try:
        done = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError("bench --slurm: sbatch is not on PATH; run the bench on a SLURM login node") from None
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or "no reason given").splitlines()[-1]
        raise ConfigError(f"bench point {j.point.name}: SLURM refuses the job ({j.job.nodes} node(s)): {reason}")


def _wait(jobs: list[PointJob]) -> None:
    start = time.monotonic()
    last_line, last_print, failing_since = "", 0.0, None
    while True:
        states = _states([j.job_id for j in jobs])
        now = time.monotonic()
        if states is None:  # the controller did not answer: try again, but not forever
            failing_since = failing_since or now
            if now - failing_since > CONTROLLER_GRACE_S:
                raise ConfigError(f"bench --slurm: squeue has failed for {CONTROLLER_GRACE_S:.0f} s; jobs "
                                  f"{', '.join(j.job_id for j in jobs)} may still run (check squeue)")
            time.sleep(POLL_S)
            continue
        failing_since = None
        for j in jobs:
            j.state = states.get(j.job_id) or _sacct_state(j.job_id) or "ENDED"  # ENDED: SLURM forgot it
            _check_ended(j)
        line = " | ".join(f"{state}: {names}" for state, names in _by_state(jobs).items())
        if line != last_line or now - last_print >= PROGRESS_S:
            print(f"slurm {_elapsed(now - start)} | {line}", flush=True)
            last_line, last_print = line, now
        if all(j.state in ("COMPLETED", "ENDED") for j in jobs):
            return
        time.sleep(POLL_S)


def _states(job_ids: list[str]) -> dict[str, str] | None:
    """Job id -> state of the jobs the controller still remembers (finished ones for MinJobAge); None if squeue
    failed. `-t all` includes the finished jobs; ids it has forgotten are simply absent."""
    try:
        done = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T"],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("bench --slurm: squeue is not on PATH; run the bench on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in done.stdout.split() if "|" in line)


def _sacct_state(job_id: str) -> str | None:
    """The state of a job the controller has forgotten, from accounting if the cluster keeps it (else None)."""
    try:
        done = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                              text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    words = done.stdout.split() if done.returncode == 0 else []
    return words[0] if words else None  # "CANCELLED by 0" -> CANCELLED


def _check_ended(j: PointJob) -> None:
    """Raise the one-line error of a job that ended without its measurements."""
    metrics = metrics_path(j.run_dir)
    if j.state in ENDED and j.state != "COMPLETED":
        raise ConfigError(f"bench point {j.point.name}: SLURM job {j.job_id} {j.state}; {j.log}: {_last_line(j.log)}")
    if j.state in ("COMPLETED", "ENDED") and not metrics.is_file():
        raise ConfigError(f"bench point {j.point.name}: SLURM job {j.job_id} {j.state} without writing {metrics}; "
                          f"{j.log}: {_last_line(j.log)}")


def _last_line(log: Path) -> str:
    """The trainer's one-line error if the log has one, else its last line: what went wrong, in one line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log: the job never started)"
    errors = [line for line in lines if "megacrystal: error:" in line]
    return (errors or lines or ["(empty)"])[-1]


def _by_state(jobs: list[PointJob]) -> dict[str, str]:
    """e.g. {'completed': 'nodes1 (1234)', 'running': 'nodes2 (1235)'}."""
    groups: dict[str, list[str]] = {}
    for j in jobs:
        groups.setdefault(j.state.lower(), []).append(f"{j.point.name} ({j.job_id})")
    return {state: ", ".join(names) for state, names in sorted(groups.items())}


def _elapsed(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _cancel(jobs: list[PointJob]) -> None:
    """scancel the bench's own jobs still queued or running: a failure or Ctrl-C leaves none behind."""
    ids = [j.job_id for j in jobs if j.job_id and j.state not in ENDED | {"ENDED"}]
    if not ids:
        return
    try:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        print(f"bench: cancelled SLURM jobs {' '.join(ids)}", file=sys.stderr)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        print(f"bench: could not cancel SLURM jobs {' '.join(ids)}; run: scancel {' '.join(ids)}", file=sys.stderr)


def meta(args, jobs: list[PointJob]) -> dict:
    """What report.json says about how the points ran."""
    return {"jobs": {j.point.name: j.job_id for j in jobs}, "logs": {j.point.name: str(j.log) for j in jobs},
            "gpus_per_node": args.gpus_per_node, "cpus_per_node": args.cpus_per_node,
            "partition": args.partition, "account": args.account, "time": args.time,
            "sbatch": list(args.sbatch_extra),
            "note": "each point ran as one SLURM job (script: `megacrystal launch slurm`'s); the environment "
                    "describes the host that ran the bench, not necessarily the nodes"}

