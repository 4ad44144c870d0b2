"""train.device: where a rank trains and which backend its process group uses, decided in one place
(distributed/runtime.py). On this CPU-only torch build: auto and cpu give the CPU over gloo, exactly as before;
cuda refuses in one line before any process group exists. The GPU side is tests/gpu/test_cuda_parity.py."""
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megacrystal.config import ConfigError, load_config
from megacrystal.distributed.runtime import backend_for, resolve_device, setup_parallel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of train.device (CUDA: tests/gpu)")


@pytest.mark.parametrize("requested", ["auto", "cpu"])
def test_without_a_gpu_auto_and_cpu_train_on_the_cpu_over_gloo(requested):
    device = resolve_device(requested)
    assert device == torch.device("cpu") and backend_for(device) == "gloo"


def test_cuda_without_a_gpu_is_refused_in_one_line_naming_the_field_and_the_fix():
    with pytest.raises(ConfigError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert message.startswith("train.device: cuda, but torch ") and "\n" not in message
    assert "sees no GPU" in message and "setup_env.sh --cuda" in message


def test_a_gpu_job_turns_auto_into_cuda(monkeypatch):
    monkeypatch.setenv("MEGACRYSTAL_REQUIRE_CUDA", "1")  # what launch slurm's GPU scripts export
    with pytest.raises(ConfigError, match=r"^train.device: auto in a GPU job \(MEGACRYSTAL_REQUIRE_CUDA=1\), but"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit choice stands


def test_backends_follow_the_device():
    assert backend_for(torch.device("cuda", 3)) == "nccl" and backend_for(torch.device("cpu")) == "gloo"


def test_the_schema_takes_only_the_three_choices(synthetic_config):
    assert load_config(synthetic_config).train.device == "auto"  # the default: no config changes
    assert load_config(synthetic_config, ["train.device=cpu"]).train.device == "cpu"
    with pytest.raises(ConfigError, match="train.device"):
        load_config(synthetic_config, ["train.device=gpu"])


def test_setup_parallel_refuses_cuda_before_any_process_group(synthetic_config):
    config = load_config(synthetic_config, ["train.device=cuda"])
    was_initialized = dist.is_initialized()
    with pytest.raises(ConfigError, match="train.device: cuda"):
        setup_parallel(config)
    assert dist.is_initialized() == was_initialized


@pytest.mark.slow  # a fresh interpreter: the CLI path end to end
def test_train_with_device_cuda_stops_in_one_line_on_a_cpu_host(synthetic_config, tmp_path):
    out = subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", str(synthetic_config),
                          "--set", "train.device=cuda", "--set", f"run.dir={tmp_path}/run"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("megacrystal: error:")]
    assert len(lines) == 1 and "train.device: cuda, but torch" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
