"""`megacrystal launch slurm`: render the sbatch script of a run from launch/slurm/train.sbatch.in, and submit it."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, load_config
from .slurm_checks import check_gpus, check_paths, check_syntax

TEMPLATE = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "train.sbatch.in"
# What may appear in an #SBATCH value: sbatch splits those lines on blanks and does no shell quoting.
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.:,@+=/%-]+")
# torchrun --numa-binding modes (torch.numa.binding.AffinityMode): each trainer on the CPUs near its GPU.
CPU_BIND_MODES = ("node", "socket", "exclusive", "core-complex", "none")
# What an NCCL interface/HCA list may hold: names, commas, and the ^ = : prefixes/suffixes NCCL reads.
_NCCL_VALUE = re.compile(r"[\^=]?[A-Za-z0-9_.:,-]+")


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
    cpu_bind: str | None = None  # GPU nodes: torchrun --numa-binding mode (default node); "none" binds nothing
    nccl_socket_ifname: str | None = None  # NCCL_SOCKET_IFNAME for the trainers (default: NCCL picks)
    nccl_ib_hca: str | None = None  # NCCL_IB_HCA (default: NCCL picks)
    check: bool = True  # check paths and the job's torch on this host (off: only the nodes see them)
    on_success: str = ""  # a shell command the batch script runs once training has finished (exit 0)
    cuda_device_max_connections: bool = False  # set by resolve(): TP comm overlap wants CUDA_DEVICE_MAX_CONNECTIONS=1

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
    check_syntax(job.time, job.partition, job.account)
    _check_gpu_options(job)
    workdir = Path(job.workdir).resolve()
    python = os.path.abspath(workdir / job.python) if os.sep in job.python else job.python  # the venv's link kept
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
    check_gpus(config, job.gpus_per_node, python, probe=job.check)
    if job.check:
        check_paths(config, workdir, log_dir)
    cpu_bind = (job.cpu_bind or "node") if job.gpus_per_node else None
    return SlurmJob(**{**job.__dict__, "config": str(config_path), "job_name": name, "log_dir": str(log_dir),
                       "workdir": str(workdir), "python": python, "cpu_bind": None if cpu_bind == "none" else cpu_bind,
                       "cuda_device_max_connections": _wants_one_connection(config, job.gpus_per_node)})


def _check_gpu_options(job: SlurmJob) -> None:
    """The GPU-node flags: known binding modes, NCCL lists in NCCL's syntax, and only with GPUs."""
    if job.cpu_bind is not None and job.cpu_bind not in CPU_BIND_MODES:
        raise ConfigError(f"--cpu-bind: {job.cpu_bind!r}; choose one of {', '.join(CPU_BIND_MODES)}")
    for flag, value in (("--cpu-bind", job.cpu_bind), ("--nccl-socket-ifname", job.nccl_socket_ifname),
                        ("--nccl-ib-hca", job.nccl_ib_hca)):
        if value is not None and not job.gpus_per_node:
            raise ConfigError(f"{flag}: only for GPU nodes; give --gpus-per-node N or drop {flag}")
        if flag != "--cpu-bind" and value is not None and not _NCCL_VALUE.fullmatch(value):
            raise ConfigError(f"{flag}: {value!r} is not an NCCL interface list (e.g. ib0, ^lo,docker, "
                              "=mlx5_0:1,mlx5_1:1)")


def _wants_one_connection(config: Config, gpus_per_node: int) -> bool:
    """megatron-core overlaps tensor-parallel communication (async dgrad all-reduce, sequence-parallel
    reduce-scatter) with compute only when CUDA schedules kernels in launch order: CUDA_DEVICE_MAX_CONNECTIONS=1."""
    return bool(gpus_per_node) and config.parallel.tp > 1


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
        "SRUN_OPTS": f" --gpus-per-node={job.gpus_per_node} --cpu-bind=none" if job.gpus_per_node else "",
        "CPU_BIND": job.cpu_bind or "",
        "ENV": _environment(job),
        "ON_SUCCESS": f"    {job.on_success}\n" if job.on_success else "",
    }
    text = re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text())
    return text


def _environment(job: SlurmJob) -> str:
    """The exports that reach every trainer of a GPU job (srun passes the batch script's environment on);
    CUDA_DEVICE_MAX_CONNECTIONS keeps a value the job's environment already has."""
    lines = []
    if job.gpus_per_node:
        lines.append("# a GPU job: a trainer whose torch sees no GPU stops in one line instead of training on the CPU")
        lines.append("export MEGACRYSTAL_REQUIRE_CUDA=1")
    if job.cuda_device_max_connections:
        lines.append("# megatron-core overlaps tensor-parallel communication with compute only if CUDA runs "
                     "kernels in launch order")
        lines.append("export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}")
    for name, value in (("NCCL_SOCKET_IFNAME", job.nccl_socket_ifname), ("NCCL_IB_HCA", job.nccl_ib_hca)):
        if value:
            lines.append(f"export {name}={shlex.quote(value)}")
    return "".join(line + "\n" for line in lines)


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
