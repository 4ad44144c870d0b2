"""`megacrystal launch slurm`: render the sbatch script of a run from launch/slurm/train.sbatch.in, and submit it."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, load_config

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "train.sbatch.in"
# What may appear in an #SBATCH value: sbatch splits those lines on blanks and does no shell quoting.
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.:,@+=/%-]+")


@dataclass
class SlurmJob:
    """Everything the rendered script depends on (paths absolute, so it runs from anywhere)."""

    config: str
    nodes: int
    gpus_per_node: int
    overrides: list[str] = field(default_factory=list)
    cpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    signal_before: int = 300
    job_name: str | None = None
    log_dir: str | None = None
    workdir: str = "."
    python: str = sys.executable
    max_requeues: int = 50
    sbatch_extra: list[str] = field(default_factory=list)

    @property
    def procs_per_node(self) -> int | None:
        """Processes per node: one per GPU; without GPUs one per CPU (None: decided on each node at run time)."""
        return self.gpus_per_node or self.cpus_per_node


def resolve(job: SlurmJob) -> SlurmJob:
    """Validate the job against its config (before anything is submitted) and fill in the defaults."""
    if job.nodes < 1:
        raise ConfigError(f"--nodes: {job.nodes}; a job needs at least one node")
    if job.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node: {job.gpus_per_node}; give 0 for CPU-only nodes")
    if job.cpus_per_node is not None and job.cpus_per_node < 1:
        raise ConfigError(f"--cpus-per-node: {job.cpus_per_node}; give a positive number")
    if job.signal_before < 1:
        raise ConfigError(f"--signal-before: {job.signal_before}; give the seconds before the time limit "
                          "at which the trainers are told to checkpoint (e.g. 300)")
    workdir = Path(job.workdir).resolve()
    config_path = (workdir / job.config).resolve()
    config = load_config(config_path, job.overrides)
    if job.procs_per_node:
        config.data_parallel_size(job.nodes * job.procs_per_node)  # a bad layout fails here, not on the cluster
    if "SIGUSR1" not in config.checkpoint.stop_signals:
        raise ConfigError(f"checkpoint.stop_signals: {config.checkpoint.stop_signals} lacks SIGUSR1, the signal the "
                          "job forwards to the trainers before the time limit; add it (the default has it)")
    name = job.job_name or config.run.name
    log_dir = Path(job.log_dir) if job.log_dir else Path(config.run_dir()) / "slurm"
    log_dir = (workdir / log_dir).resolve()
    for flag, value in (("--job-name", name), ("--partition", job.partition), ("--time", job.time),
                        ("--account", job.account), ("--log-dir", str(log_dir)), ("working directory", str(workdir))):
        if value is not None and not _SBATCH_VALUE.fullmatch(value):
            raise ConfigError(f"{flag}: {value!r} has characters an #SBATCH line cannot carry (blanks, quotes, "
                              "newlines...); use letters, digits and . _ - : , @ + = / %")
    for extra in job.sbatch_extra:
        if not extra.startswith("--") or "\n" in extra or "#" in extra:
            raise ConfigError(f"--sbatch {extra!r}: give one sbatch option per --sbatch, e.g. --sbatch=--qos=high")
    return SlurmJob(**{**job.__dict__, "config": str(config_path), "job_name": name, "log_dir": str(log_dir),
                       "workdir": str(workdir)})


def render(job: SlurmJob, command: str = "") -> str:
    """The sbatch script of a resolved job."""
    sbatch = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node:
        sbatch.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        sbatch.append(f"--cpus-per-task={job.cpus_per_node}")
    else:
        sbatch.append("--exclusive")  # every CPU of the node: trainers and data loading share them
    for flag, value in (("--partition", job.partition), ("--account", job.account), ("--time", job.time)):
        if value:
            sbatch.append(f"{flag}={value}")
    sbatch += [f"--signal=B:USR1@{job.signal_before}", "--requeue", "--open-mode=append",
               f"--output={job.log_dir}/%x-%j.out", f"--chdir={job.workdir}", *job.sbatch_extra]
    sets = "".join(f" \\\n        --set {shlex.quote(item)}" for item in job.overrides)
    values = {
        "COMMAND": command.replace("\n", "\\n") or "megacrystal launch slurm",
        "SBATCH": "\n".join(f"#SBATCH {line}" for line in sbatch),
        "PYTHON": shlex.quote(job.python),
        "LOG_DIR": shlex.quote(job.log_dir),
        "NPROC_PER_NODE": str(job.procs_per_node or ""),
        "MAX_REQUEUES": str(job.max_requeues),
        "CONFIG": shlex.quote(job.config),
        "SET_ARGS": sets,
        "SRUN_OPTS": f" --gpus-per-node={job.gpus_per_node}" if job.gpus_per_node else "",
    }
    text = re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text())
    return text


def submit(job: SlurmJob, script: str) -> str:
    """Write the script next to the job's logs, sbatch it, and return the job id."""
    log_dir = Path(job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    path = log_dir / f"{job.job_name}.sbatch"
    path.write_text(script)
    try:
        done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError("--submit: sbatch is not on PATH; run this on a SLURM login node, or use --dry-run "
                          "and submit the script yourself") from None
    if done.returncode != 0:
        raise ConfigError(f"--submit: sbatch failed: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: script {path}, log {log_dir}/{job.job_name}-{job_id}.out", file=sys.stderr)
    return job_id
