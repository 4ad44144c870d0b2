"""The per-node launcher: `launch/local.sh --nnodes ...` argument checks, and megacrystal's torchrun turning a
SIGUSR1 into a checkpoint and exit code 75 even when it arrives while the trainers are still starting."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megacrystal.launch.processes import kill_tree

from .conftest import ROOT, STEPS, latest_checkpoint, steps_done


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "--nnodes needs --master-addr with --node-rank (static) or --rdzv-endpoint"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1"], "static rendezvous (--master-addr) needs --node-rank"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank 2 is not below --nnodes 2"),
    (["--nnodes", "2", "--master-addr", "a", "--rdzv-endpoint", "a:1", "--node-rank", "0"], "not both"),
    (["--node-rank", "1"], "multi-node options need --nnodes"),
    (["--nnodes", "two", "--rdzv-endpoint", "a:1"], "--nnodes must be a positive integer"),
])
def test_local_sh_rejects_incomplete_multi_node_options(args, message):
    out = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "1", "configs/crystal-tiny.yaml", *args,
                          "--set", "train.steps=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.slow
def test_usr1_while_the_trainers_start_still_ends_in_a_checkpoint_and_exit_75(synthetic_config, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megacrystal.launch.torchrun", "--standalone", "--nproc-per-node", "2",
         "-m", "megacrystal.launch.worker", "train", "--config", str(synthetic_config),
         "--set", f"run.dir={run}", "--set", f"train.steps={STEPS}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "MEGACRYSTAL_NODE_STATUS": str(tmp_path / "status")})
    try:
        deadline = time.time() + 60
        while len(psutil.Process(proc.pid).children()) < 2:  # the trainers exist, and are importing torch
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        assert steps_done(run) == 0
        proc.send_signal(signal.SIGUSR1)  # what srun forwards from the batch script's trap
        _, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 75, stderr[-3000:]
    assert "the trainers saved a checkpoint on a stop request and stopped (exit 75)" in stderr
    assert (tmp_path / "status").read_text() == "75\n"
    assert 1 <= latest_checkpoint(run) == steps_done(run) < STEPS  # stopped at the first step boundary
