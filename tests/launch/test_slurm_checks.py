"""What `megacrystal launch slurm` refuses before it writes a script: bad SLURM values, paths the job cannot use on
the submitting host (unless --no-check), and GPUs for an env whose torch has no CUDA. Each refusal is one line."""
import re
import sys
from pathlib import Path

import pytest
import torch

from megacrystal.cli import main
from megacrystal.config import ConfigError
from megacrystal.launch.slurm_checks import check_syntax

ROOT = Path(__file__).resolve().parents[2]
SEVEN_B = ["launch", "slurm", "--config", "configs/crystal-7b.yaml"]


def _run(args, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.chdir(ROOT)
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(args, monkeypatch, capsys) -> str:
    code, out, err = _run(args, monkeypatch, capsys)
    assert code == 2 and out == "", err
    assert err.startswith("megacrystal: error:") and err.count("\n") == 1, err
    return err


# Every form `man sbatch` lists for --time, and the words for no limit.
@pytest.mark.parametrize("time", ["90", "0", "90:30", "10:00:00", "2-12", "2-12:30", "2-12:30:15", "UNLIMITED",
                                  "infinite"])
def test_every_sbatch_time_format_is_accepted(time):
    check_syntax(time, None, None)


@pytest.mark.parametrize("time", ["banana", "1:2:3:4", "2-", "-5", "1.5", "2-12:30:15:1", "", "1h", "2:", "2-:30"])
def test_other_times_are_refused(time):
    with pytest.raises(ConfigError, match=re.escape(f"--time: {time!r} is not a SLURM time")):
        check_syntax(time, None, None)


@pytest.mark.parametrize("partition, account, ok", [
    ("gpu", "llm360", True), ("gpu,gpu-long", "proj_a.b", True),
    ("gpu;rm", None, False), ("gpu,", None, False), (None, "a/b", False), (None, "", False)])
def test_partitions_and_accounts_are_slurm_names(partition, account, ok):
    if ok:
        check_syntax(None, partition, account)
    else:
        with pytest.raises(ConfigError, match="--partition|--account"):
            check_syntax(None, partition, account)


def test_a_bad_time_fails_on_the_command_line_before_the_config_is_read(monkeypatch, capsys):
    err = _refused([*SEVEN_B, "--nodes", "2", "--gpus-per-node", "8", "--time", "banana", "--dry-run"],
                   monkeypatch, capsys)
    assert "--time: 'banana' is not a SLURM time" in err


def _cpu_7b(*extra: str) -> list[str]:
    """The 7B on 4 CPU nodes x 2 processes (tp 2 x pp 4 = 8 ranks): no GPU check, only the path checks."""
    return [*SEVEN_B, "--nodes", "4", "--gpus-per-node", "0", "--cpus-per-node", "2", *extra, "--dry-run"]


def test_placeholder_data_paths_are_refused_unless_no_check(monkeypatch, capsys, tmp_path):
    err = _refused(_cpu_7b("--set", f"run.dir={tmp_path}/run"), monkeypatch, capsys)
    assert "data.datasets.arxiv.inputs: /path/to/SlimPajama/arxiv does not exist on this host" in err
    assert "--no-check" in err
    code, out, _ = _run(_cpu_7b("--set", f"run.dir={tmp_path}/run", "--no-check"), monkeypatch, capsys)
    assert code == 0 and out.startswith("#!/bin/bash")


def _sets(**paths: str) -> list[str]:
    return [word for key, value in paths.items() for word in ("--set", f"{key.replace('__', '.')}={value}")]


def _with_inputs(tmp_path: Path) -> list[str]:
    """Every 7B dataset pointed at one existing file."""
    source = tmp_path / "input.jsonl"
    source.write_text('{"text": "x"}\n')
    names = ["arxiv", "book", "c4", "commoncrawl", "github", "stackexchange", "wikipedia", "starcoder", "python",
             "html", "javascript", "css"]
    return [word for name in names for word in ("--set", f"data.datasets.{name}.inputs=[{source}]")]


def test_a_missing_tokenizer_or_unprepared_data_dir_is_refused(monkeypatch, capsys, tmp_path):
    inputs = _with_inputs(tmp_path)
    err = _refused(_cpu_7b(*inputs, *_sets(run__dir=f"{tmp_path}/run")), monkeypatch, capsys)
    assert "data.tokenizer.model: /path/to/llama-7b/tokenizer.model does not exist on this host" in err
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"\0")
    err = _refused(_cpu_7b(*inputs, *_sets(data__tokenizer__model=str(tokenizer), data__dir=f"{tmp_path}/none",
                                           run__dir=f"{tmp_path}/run")), monkeypatch, capsys)
    assert f"data.dir: {tmp_path}/none does not exist: run `megacrystal prepare" in err
    code, _, err = _run(_cpu_7b(*inputs, *_sets(data__tokenizer__model=str(tokenizer), data__dir=str(tmp_path),
                                                 run__dir=f"{tmp_path}/run/deeper")), monkeypatch, capsys)
    assert code == 0, err  # a run directory that does not exist yet but can be created is fine


def test_a_run_or_log_directory_that_cannot_be_created_is_refused(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = ["launch", "slurm", "--config", "configs/crystal-tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
            "--set", f"data.dir={tmp_path}", "--dry-run"]
    err = _refused([*base, "--set", f"run.dir={blocker}/run"], monkeypatch, capsys)
    assert f"run.dir: {blocker}/run cannot be created here" in err
    err = _refused([*base, "--set", f"run.dir={tmp_path}/run", "--set", f"checkpoint.dir={blocker}/ckpt"],
                   monkeypatch, capsys)
    assert f"checkpoint.dir: {blocker}/ckpt cannot be created here" in err
    err = _refused([*base, "--set", f"run.dir={tmp_path}/run", "--log-dir", f"{blocker}/logs"], monkeypatch, capsys)
    assert f"--log-dir: {blocker}/logs cannot be created here" in err


def _tiny_gpus(tmp_path: Path, *extra: str) -> list[str]:
    return ["launch", "slurm", "--config", "configs/crystal-tiny.yaml", "--nodes", "1", "--gpus-per-node", "2",
            "--set", f"data.dir={tmp_path}", "--set", f"run.dir={tmp_path}/run", *extra, "--dry-run"]


@pytest.mark.slow  # runs the venv's python to import torch
@pytest.mark.skipif(torch.version.cuda is not None, reason="needs the CPU build of torch (the CI machine's)")
def test_gpus_are_refused_when_the_jobs_torch_has_no_cuda(monkeypatch, capsys, tmp_path):
    err = _refused(_tiny_gpus(tmp_path), monkeypatch, capsys)
    assert f"--gpus-per-node 2: the job's torch ({torch.__version__}, {sys.executable}) is built without CUDA" in err
    assert "setup_env.sh --cuda" in err
    code, out, err = _run(_tiny_gpus(tmp_path, "--no-check"), monkeypatch, capsys)
    assert code == 0 and "NPROC_PER_NODE=2 " in out, err


def test_a_job_python_whose_torch_has_cuda_passes_and_runs_on_the_nodes(monkeypatch, capsys, tmp_path):
    """A stand-in for a CUDA env's python: it answers the probe the way a CUDA build of torch does."""
    python = tmp_path / "cuda-env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\n[ "$1" = -c ] && echo "2.13.0+cu128 12.8"\n')
    python.chmod(0o755)
    code, out, err = _run(_tiny_gpus(tmp_path, "--python", str(python)), monkeypatch, capsys)
    assert code == 0, err
    assert f"PYTHON={python}\n" in out and "--gpus-per-node=2" in out
    err = _refused(_tiny_gpus(tmp_path, "--python", str(tmp_path / "nowhere" / "python")), monkeypatch, capsys)
    assert "--python: cannot run" in err


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.device=cpu"], "train.device: cpu, but --gpus-per-node 2 asks for GPUs"),
    (["--cpu-bind", "everywhere"], "--cpu-bind: 'everywhere'; choose one of node, socket"),
    (["--nccl-ib-hca", "mlx5_0 mlx5_1"], "--nccl-ib-hca: 'mlx5_0 mlx5_1' is not an NCCL interface list"),
])
def test_gpu_options_that_cannot_work_are_refused(monkeypatch, capsys, tmp_path, extra, message):
    code, out, err = _run(_tiny_gpus(tmp_path, "--no-check", *extra), monkeypatch, capsys)
    assert code == 2 and out == "" and message in err, err


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.device=cuda"], "train.device: cuda needs GPU nodes"),
    (["--nccl-socket-ifname", "ib0"], "--nccl-socket-ifname: only for GPU nodes"),
])
def test_gpu_settings_on_cpu_nodes_are_refused(monkeypatch, capsys, tmp_path, extra, message):
    args = ["launch", "slurm", "--config", "configs/crystal-tiny.yaml", "--nodes", "1", "--gpus-per-node", "0",
            "--no-check", *extra, "--dry-run"]
    err = _refused(args, monkeypatch, capsys)
    assert message in err
