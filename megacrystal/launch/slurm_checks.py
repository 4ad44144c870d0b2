"""What `megacrystal launch slurm` checks before it writes a script: sbatch's own value syntax, the paths the job
reads and writes (on the submitting host, unless --no-check), and that the job's torch can use the GPUs it asks for.

Each check fails with one ConfigError line that names the flag or config field and the fix.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

from ..config import Config, ConfigError

# sbatch --time: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours", "days-hours:minutes",
# "days-hours:minutes:seconds" (man sbatch); 0, UNLIMITED and INFINITE mean no limit.
_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}", re.ASCII)
_NO_LIMIT = ("UNLIMITED", "INFINITE")
# A partition (or a comma-separated list of them: sbatch takes the first that can run the job) and an account:
# SLURM names are letters, digits, '_', '-' and '.'.
_NAME = r"[A-Za-z0-9_.-]+"
_PARTITIONS = re.compile(rf"{_NAME}(,{_NAME})*", re.ASCII)
_ACCOUNT = re.compile(_NAME, re.ASCII)
TORCH_PROBE = "import torch; print(torch.__version__, torch.version.cuda)"


def check_syntax(time: str | None, partition: str | None, account: str | None) -> None:
    """sbatch's syntax for --time, --partition and --account (sbatch itself would only fail at submission)."""
    if time is not None and not (_TIME.fullmatch(time) or time.upper() in _NO_LIMIT):
        raise ConfigError(f"--time: {time!r} is not a SLURM time; give minutes, minutes:seconds, "
                          "hours:minutes:seconds, days-hours, days-hours:minutes or days-hours:minutes:seconds "
                          "(e.g. 90, 2-00:00:00)")
    if partition is not None and not _PARTITIONS.fullmatch(partition):
        raise ConfigError(f"--partition: {partition!r} is not a partition name (letters, digits, _ - .; several "
                          "separated by commas)")
    if account is not None and not _ACCOUNT.fullmatch(account):
        raise ConfigError(f"--account: {account!r} is not an account name (letters, digits, _ - .)")


def _creatable(path: Path) -> bool:
    """Whether `path` is a writable directory or could be created: its nearest existing ancestor is writable."""
    for parent in (path, *path.parents):
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    return False


def check_paths(config: Config, workdir: Path, log_dir: Path) -> None:
    """The data, tokenizer and output directories of the run, as the job (in `workdir`) will see them."""
    from ..config.data import CORPUS_PREFIX

    def here(path: str) -> Path:
        return (workdir / path).resolve()

    hint = "fix the path, or pass --no-check if only the compute nodes see it"
    d = config.data
    if d.source == "indexed":
        for name, dataset in d.datasets.items():
            for item in dataset.inputs:
                if not item.startswith(CORPUS_PREFIX) and not here(item).exists():
                    raise ConfigError(f"data.datasets.{name}.inputs: {item} does not exist on this host; {hint}")
        if d.tokenizer.model and not here(d.tokenizer.model).is_file():
            raise ConfigError(f"data.tokenizer.model: {d.tokenizer.model} does not exist on this host; {hint}")
        data_dir = here(d.dir.format(name=config.run.name))
        if not data_dir.is_dir():
            raise ConfigError(f"data.dir: {data_dir} does not exist: run `megacrystal prepare --config ...` "
                              f"before the job, or {hint}")
    for field, path in (("run.dir", here(config.run_dir())), ("checkpoint.dir", here(config.checkpoint_dir())),
                        ("--log-dir", log_dir)):
        if not _creatable(path):
            raise ConfigError(f"{field}: {path} cannot be created here (no write access, or a file is in the "
                              f"way); {hint}")


@functools.lru_cache(maxsize=None)  # bench --slurm resolves one job per sweep point, all with one python
def job_torch(python: str) -> tuple[str, str | None]:
    """(torch version, CUDA version or None) of the job's interpreter, by running it (not this process's torch)."""
    try:
        done = subprocess.run([python, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ConfigError(f"--python: cannot run {python} ({error}); build the env with bash launch/setup_env.sh "
                          "or name its python with --python") from None
    words = done.stdout.split()
    if done.returncode != 0 or len(words) != 2:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--python: {python} cannot import torch ({last}); build the env with "
                          "bash launch/setup_env.sh")
    return words[0], None if words[1] == "None" else words[1]


def check_gpus(config: Config, gpus_per_node: int, python: str, probe: bool = True) -> None:
    """A config that pins train.device must agree with the nodes; GPU nodes need a CUDA build of torch in the
    job's env (checked by running `python` when `probe`)."""
    device = config.train.device
    if gpus_per_node and device == "cpu":
        raise ConfigError(f"train.device: cpu, but --gpus-per-node {gpus_per_node} asks for GPUs; set "
                          "train.device: auto (or cuda), or give --gpus-per-node 0")
    if not gpus_per_node and device == "cuda":
        raise ConfigError("train.device: cuda needs GPU nodes; give --gpus-per-node N (the GPUs of a node)")
    if gpus_per_node and probe:
        version, cuda = job_torch(python)
        if cuda is None:
            raise ConfigError(f"--gpus-per-node {gpus_per_node}: the job's torch ({version}, {python}) is built "
                              "without CUDA, so it would train on the CPU; build a GPU env with "
                              "bash launch/setup_env.sh --cuda, or pass --no-check if the nodes use another env")
