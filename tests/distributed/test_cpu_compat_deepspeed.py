"""Each DeepSpeed CPU workaround in cpu_compat is still needed (upstream misbehaves without it) and works.

The upstream cases run in fresh interpreters: DeepSpeed picks its accelerator once per process, at import.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacrystal.distributed.runtime import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the workarounds apply only without CUDA")

# deepspeed.init_distributed builds DeepSpeed's communication backend, which is where the shm op is built.
_INIT = """
import sys
if sys.argv[1] == "patched":  # as the runtime does before any engine imports deepspeed
    from megacrystal.quiet import quiet_expected_warnings
    quiet_expected_warnings()
    from megacrystal.distributed import cpu_compat
    assert "deepspeed" not in sys.modules
    cpu_compat.install()
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
print("initialized")
"""


def _python(code: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return {**env, **extra}


@pytest.mark.slow
def test_accelerator_autodetect_warns_without_ds_accelerator():
    # Upstream: get_accelerator() finds no GPU and logs a WARNING on every rank. If this stops appearing,
    # cpu_compat.deepspeed_accelerator_env is no longer needed.
    out = _python("import deepspeed", env=_env())
    assert "Setting accelerator to CPU" in out.stdout + out.stderr


@pytest.mark.slow
def test_init_distributed_jit_builds_shm_op_unless_patched(tmp_path):
    # A compiler that always fails and an empty extension cache: the build DeepSpeed attempts (about a
    # minute with a real g++) shows up as an immediate failure instead.
    def env(cache: str, **extra) -> dict:
        return _env(CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path / cache), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", **extra)

    upstream = _python(_INIT, "upstream", env=env("upstream", DS_ACCELERATOR="cpu"))
    assert upstream.returncode != 0 and "/bin/false" in upstream.stderr, \
        "init_distributed no longer builds the shm op on CPU: drop cpu_compat._disable_deepspeed_shm_comm_build"

    patched = _python(_INIT, "patched", env=env("patched"))
    assert patched.returncode == 0, patched.stderr
    # Nothing built and nothing printed: no accelerator warning, no "built successfully".
    assert patched.stdout == "initialized\n" and patched.stderr == "", patched.stdout + patched.stderr
    assert not (tmp_path / "patched").exists()


def test_accelerator_env_respects_the_user_and_cuda(monkeypatch):
    from megacrystal.distributed import cpu_compat

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # also restores the variable's original state afterwards
    assert cpu_compat.deepspeed_accelerator_env() is False  # the user's choice stands
    del os.environ["DS_ACCELERATOR"]
    with monkeypatch.context() as patch:
        patch.setattr(cpu_compat, "needed", lambda: False)  # as with CUDA: DeepSpeed autodetects
        assert cpu_compat.deepspeed_accelerator_env() is False and "DS_ACCELERATOR" not in os.environ
    assert cpu_compat.deepspeed_accelerator_env() is True
    assert os.environ["DS_ACCELERATOR"] == "cpu"
