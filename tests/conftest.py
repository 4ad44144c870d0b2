"""Session fixtures shared across test packages."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")
TESTCLUSTER = ROOT / "launch" / "slurm" / "testcluster.sh"
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """`megacrystal prepare` of the tiny config (corpus, tokenizer, datasets); returns the --set to use it."""
    data_dir = tmp_path_factory.mktemp("tiny-data")
    overrides = ["--set", f"data.dir={data_dir}"]
    out = subprocess.run([sys.executable, "-m", "megacrystal", "prepare", "--config", TINY, *overrides],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return overrides


SYNTHETIC = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96, "vocab_size": 128,
              "seq_length": 32},
    "optim": {"lr": 0.01, "warmup_steps": 2},
    "train": {"steps": 12, "global_batch_size": 8, "micro_batch_size": 2, "threads": 1, "log_interval": 1},
    "checkpoint": {"interval": 2, "keep": 20},
}


@pytest.fixture(scope="session")
def synthetic_config(tmp_path_factory) -> Path:
    """A YAML config of a very small Crystal on the synthetic stream: 12 steps, a checkpoint every 2."""
    import yaml

    path = tmp_path_factory.mktemp("synthetic") / "synthetic.yaml"
    path.write_text(yaml.safe_dump(SYNTHETIC))
    return path


def _slurm_missing() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd); run as root, as .ci/run does"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [p for p in SLURM_PROGRAMS if not shutil.which(p, path=path)]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                "slurm-client munge (.ci/run does)")
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real two-node SLURM cluster on this machine (launch/slurm/testcluster.sh: munge, slurmctld, slurmd n1 and
    n2, private ports, state and munge socket, in $MEGACRYSTAL_SLURM_BASE or a fresh directory); yields the
    environment that reaches it. One per test module, torn down by PID at the module's end, whatever happened."""
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    base = os.environ.get("MEGACRYSTAL_SLURM_BASE") or tempfile.mkdtemp(prefix="megacrystal-slurm-", dir="/tmp")
    try:
        up = subprocess.run(["bash", str(TESTCLUSTER), "up", base], capture_output=True, text=True, env=env,
                            timeout=120)
        assert up.returncode == 0, f"cluster bring-up failed:\n{up.stderr}"
        env["SLURM_CONF"] = f"{base}/slurm.conf"
        yield env
    finally:
        down = subprocess.run(["bash", str(TESTCLUSTER), "down", base], capture_output=True, text=True, env=env,
                              timeout=120)
        leftovers = _daemons_of(base)
        if not os.environ.get("MEGACRYSTAL_SLURM_BASE"):
            shutil.rmtree(base, ignore_errors=True)
        assert down.returncode == 0 and not leftovers, f"daemons left running: {leftovers}\n{down.stderr}"


def _daemons_of(base: str) -> list[str]:
    """Processes (not zombies) still running with this cluster's config or munge socket on their command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if base in cmdline and state != "Z":
            found.append(f"{pid} {cmdline}")
    return found
