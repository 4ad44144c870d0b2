"""`megacrystal launch slurm --dry-run`: the script it prints, byte for byte for a 4-node x 8-GPU run, and safely.

The 7B's data paths are placeholders and this host's torch has no CUDA, so its renders pass --no-check (the checks
on the submitting host have their own tests in test_slurm_checks.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megacrystal.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "crystal-7b-4x8gpu.sbatch"
SEVEN_B = [
    "launch", "slurm", "--config", "configs/crystal-7b.yaml", "--nodes", "4", "--gpus-per-node", "8",
    "--partition", "gpu", "--time", "2-00:00:00", "--account", "llm360", "--signal-before", "600",
    "--job-name", "crystal-7b-phase2",
    # a blend change from the command line: phase 2 with more code, phase 3 with all Python
    "--set", "data.phases.phase2.weights={c4: 0.2, commoncrawl: 0.4, github: 0.05, starcoder: 0.35}",
    "--set", "data.phases.phase3.weights={python: 1.0}",
    "--no-check", "--dry-run",
]


def _render(args, monkeypatch, capsys) -> str:
    monkeypatch.chdir(ROOT)
    assert main(args) == 0
    return capsys.readouterr().out


def _portable(script: str) -> str:
    """The script with this checkout's paths replaced, so the golden file holds anywhere."""
    return script.replace(sys.executable, "@PYTHON@").replace(str(ROOT), "@ROOT@")


def test_dry_run_of_the_7b_on_4_nodes_x_8_gpus_matches_the_golden_file(monkeypatch, capsys):
    script = _portable(_render(SEVEN_B, monkeypatch, capsys))
    if os.environ.get("MEGACRYSTAL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), \
        "the rendered script changed; if intended: MEGACRYSTAL_UPDATE_GOLDEN=1 pytest tests/launch/test_slurm_render.py"


def test_the_rendered_script_is_valid_bash(monkeypatch, capsys, tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(_render(SEVEN_B, monkeypatch, capsys))
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_script_carries_what_a_preemptible_multi_node_job_needs(monkeypatch, capsys):
    script = _render(SEVEN_B, monkeypatch, capsys)
    sbatch = re.findall(r"^#SBATCH (.*)$", script, re.M)
    assert sbatch[:4] == ["--job-name=crystal-7b-phase2", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"]
    for line in ["--partition=gpu", "--account=llm360", "--time=2-00:00:00", "--signal=B:USR1@600", "--requeue",
                 "--open-mode=append", f"--output={ROOT}/runs/crystal-7b/slurm/%x-%j.out", f"--chdir={ROOT}"]:
        assert line in sbatch
    assert "NPROC_PER_NODE=8" in script and "--resume auto" in script
    assert 'NodeAddr=' in script and '--rdzv-backend=c10d' in script and '"$SLURM_NODEID" = 0' in script
    assert "trap on_usr1 USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_gpu_nodes_get_one_trainer_per_gpu_bound_near_it_and_the_nccl_settings(monkeypatch, capsys):
    script = _render(SEVEN_B, monkeypatch, capsys)
    assert "NPROC_PER_NODE=8 " in script and "--gpus-per-node=8 --cpu-bind=none" in script  # srun: all CPUs
    assert "CPU_BIND=node " in script and '--numa-binding="$CPU_BIND"' in script
    # tp 2 with sequence parallelism: megatron-core's comm overlap wants kernels in launch order
    assert "\nexport CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}\n" in script
    assert "\nexport MEGACRYSTAL_REQUIRE_CUDA=1\n" in script  # no silent fall-back to the CPU on a GPU node
    assert "NCCL_SOCKET_IFNAME" not in script and "NCCL_IB_HCA" not in script  # NCCL picks unless told
    script = _render([*SEVEN_B, "--nccl-socket-ifname", "^lo,docker", "--nccl-ib-hca", "=mlx5_0:1,mlx5_1:1",
                      "--cpu-bind", "exclusive"], monkeypatch, capsys)
    assert "\nexport NCCL_SOCKET_IFNAME='^lo,docker'\nexport NCCL_IB_HCA==mlx5_0:1,mlx5_1:1\n" in script
    assert "CPU_BIND=exclusive " in script
    script = _render([*SEVEN_B, "--set", "parallel.tp=1", "--set", "parallel.sp=false", "--cpu-bind", "none"],
                     monkeypatch, capsys)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in script and "CPU_BIND= " in script


def test_the_node_function_binds_trainers_only_where_numactl_exists(monkeypatch, capsys, tmp_path):
    """node_main of the rendered script, run by bash with srun's variables and the python replaced by a recorder."""
    script = _render(SEVEN_B, monkeypatch, capsys)
    start = script.index("log() {")
    functions = script[start:script.index("\nSRUN_PID=", start)]
    record = tmp_path / "argv"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("scontrol", "hostname", "date", "sed", "head", "awk", "getent", "printf"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found.startswith("/"):
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "PYTHON": str(fake), "CPU_BIND": "node", "NPROC_PER_NODE": "8",
           "SLURMD_NODENAME": "gpu1", "SLURM_NODEID": "0", "SLURM_NNODES": "4", "SLURM_JOB_ID": "7",
           "STATUS_DIR": str(tmp_path), "HEAD_ADDR": "10.0.0.1", "RDZV_PORT": "29500", "GLOO_SOCKET_IFNAME": "eth0"}

    def argv() -> list[str]:
        out = subprocess.run(["/bin/bash", "-c", functions + '\nnode_main train --x'], env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        return record.read_text().split("\n")

    assert not any(a.startswith("--numa-binding") for a in argv())  # no numactl on PATH: unbound, but running
    (bin_dir / "numactl").symlink_to("/bin/true")
    words = argv()
    assert "--numa-binding=node" in words and words.index("--numa-binding=node") < words.index("-m", 2)
    assert words[words.index("-m", 2):] == ["-m", "megacrystal.launch.worker", "train", "--x", ""]


def _train_args(script: str, tmp_path: Path) -> list[str]:
    """The argument vector the script hands to every node (its TRAIN_ARGS array, evaluated by bash)."""
    start = script.index("TRAIN_ARGS=(")
    block = script[start:script.index("\n)\n", start) + 3]
    path = tmp_path / "args.sh"
    path.write_text(block + 'printf "%s\\0" "${TRAIN_ARGS[@]}"\n')
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\0")[:-1]


def test_set_overrides_reach_the_trainer_verbatim_however_they_are_quoted(monkeypatch, capsys, tmp_path):
    nasty = ["data.datasets.arxiv.inputs=[\"/data/it's here\", '$(touch pwned)', \"`touch pwned2`\"]",
             "data.datasets.book.inputs=[\"/x/a b/$HOME/\\n\\\"q\\\"\", \"line\\nbreak\"]",
             "data.datasets.css.inputs=['/x/new\nline; touch pwned3']",  # a real newline
             "data.phases.phase1.weights={arxiv: 0.5, c4: 0.5}"]
    args = ["launch", "slurm", "--config", "configs/crystal-7b.yaml", "--nodes", "2", "--gpus-per-node", "8",
            "--no-check"]
    for item in nasty:
        args += ["--set", item]
    script = _render(args + ["--dry-run"], monkeypatch, capsys)
    train_args = _train_args(script, tmp_path)
    assert train_args == ["train", "--config", str(ROOT / "configs" / "crystal-7b.yaml"), "--resume", "auto",
                          *[word for item in nasty for word in ("--set", item)]]
    assert not list(tmp_path.glob("pwned*"))
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    assert script.splitlines()[2].startswith("#   megacrystal launch slurm")  # the newline stays in the comment
    assert script.splitlines()[3] == "#"


def test_cpu_nodes_run_one_process_per_requested_cpu_or_per_allocated_cpu(monkeypatch, capsys, tmp_path):
    base = ["launch", "slurm", "--config", "configs/crystal-tiny.yaml", "--nodes", "2", "--gpus-per-node", "0",
            "--set", f"run.dir={tmp_path}/run", "--set", f"data.dir={tmp_path}", "--dry-run"]
    script = _render(base + ["--cpus-per-node", "2"], monkeypatch, capsys)
    assert "NPROC_PER_NODE=2 " in script and "#SBATCH --cpus-per-task=2" in script
    assert "--gpus-per-node" not in "".join(re.findall(r"^#SBATCH .*$", script, re.M))
    assert "CPU_BIND= " in script and not re.search(r"^export (CUDA|NCCL|MEGACRYSTAL_REQUIRE)", script, re.M)
    script = _render(base, monkeypatch, capsys)
    assert "NPROC_PER_NODE= " in script and "#SBATCH --exclusive" in script  # decided per node at run time


@pytest.mark.parametrize("extra, message", [
    (["--gpus-per-node", "8", "--set", "parallel.tp=3"], "parallel.tp: 3 does not divide"),
    (["--gpus-per-node", "3"], "world size 6 is not divisible by tp x pp = 8"),  # 2 nodes x 3 for tp 2 x pp 4
    (["--gpus-per-node", "8", "--job-name", "my job"], "--job-name: 'my job' has characters"),
    (["--gpus-per-node", "8", "--sbatch", "qos=high"], "--sbatch 'qos=high'"),
    (["--gpus-per-node", "8", "--set", "checkpoint.stop_signals=[SIGTERM]"], "lacks SIGUSR1"),
])
def test_bad_launch_arguments_fail_in_one_line_before_anything_is_written(monkeypatch, capsys, extra, message):
    monkeypatch.chdir(ROOT)
    code = main(["launch", "slurm", "--config", "configs/crystal-7b.yaml", "--nodes", "2", *extra, "--dry-run"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("megacrystal: error:") and message in captured.err, captured.err


def test_submit_without_sbatch_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code = main(["launch", "slurm", "--config", "configs/crystal-tiny.yaml", "--nodes", "1", "--gpus-per-node",
                 "0", "--set", f"run.dir={tmp_path}/run", "--set", f"data.dir={tmp_path}", "--submit"])
    assert code == 2 and "sbatch is not on PATH" in capsys.readouterr().err


def test_submit_prints_the_job_id(monkeypatch, capsys, tmp_path):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = --parsable ] && bash -n "$2" && echo "4242;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    code = main(["launch", "slurm", "--config", "configs/crystal-tiny.yaml", "--nodes", "1", "--gpus-per-node",
                 "0", "--set", f"run.dir={tmp_path}/run", "--set", f"data.dir={tmp_path}", "--submit"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out == "4242\n", captured.err
    assert (tmp_path / "run" / "slurm" / "crystal-tiny.sbatch").is_file()  # the script that ran, next to its logs
