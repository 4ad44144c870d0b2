"""launch/gpu-check.sh on a machine without CUDA: one line saying so, exit 0, nothing run and nothing written.
(Its CUDA side runs tests/gpu and the bench; see the script.)"""
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "gpu-check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: run the script itself")


def _run(env: dict, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEGACRYSTAL_GPU_CHECK_OUT": str(out), **env})


def test_without_cuda_it_says_so_in_one_line_and_runs_nothing(tmp_path):
    import sys

    out = _run({"MEGACRYSTAL_PYTHON": sys.executable}, tmp_path / "report")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.count("\n") == 1 and out.stdout.startswith("gpu-check: no CUDA GPU here")
    assert f"torch {torch.__version__}" in out.stdout and out.stdout.rstrip().endswith("nothing run")
    assert not (tmp_path / "report").exists()


def test_without_an_env_or_a_driver_it_says_so_too(tmp_path):
    bare = tmp_path / "bin"  # the shell's tools, no nvidia-smi
    bare.mkdir()
    for tool in ("dirname", "grep"):
        (bare / tool).symlink_to(subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                                                text=True).stdout.strip())
    out = _run({"MEGACRYSTAL_PYTHON": str(tmp_path / "no-env" / "python"), "PATH": str(bare)}, tmp_path / "report")
    assert out.returncode == 0 and out.stdout == "gpu-check: no CUDA GPU on this machine (no nvidia-smi GPUs, no " \
        "env to ask); nothing run\n", out.stderr
    assert not (tmp_path / "report").exists()
