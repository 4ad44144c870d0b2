"""A real SLURM cluster on this machine (munge, slurmctld, two slurmd emulating nodes n1 and n2): a 2-node job
rendered by `megacrystal launch slurm --submit` is told to stop the way SLURM does before a time limit
(`scancel --batch --signal=USR1`), checkpoints, requeues itself, resumes, and ends with the uninterrupted losses.

The cluster comes from tests/conftest.py's `slurm_cluster` (launch/slurm/testcluster.sh, with private ports,
state and munge socket; every daemon stopped by PID when the module ends, whatever happened). .ci/run installs
the packages; without them (or without root) the test is skipped.
"""
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, STEPS, latest_checkpoint, losses, steps_done

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _job(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait(what: str, predicate, timeout: float, explain) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}\n{explain()}"
        time.sleep(0.2)


def test_a_two_node_job_checkpoints_on_usr1_requeues_and_resumes_to_the_same_losses(
        slurm_cluster, synthetic_config, reference_losses, tmp_path):
    run = tmp_path / "run"
    env = {**slurm_cluster, "MEGACRYSTAL_RDZV_PORT": str(_free_port())}
    started = time.time()
    submit = subprocess.run(
        [sys.executable, "-m", "megacrystal", "launch", "slurm", "--config", str(synthetic_config),
         "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-node", "1", "--time", "10", "--signal-before", "60",
         "--job-name", "mc-requeue", "--set", f"run.dir={run}", "--set", f"train.steps={STEPS}", "--submit"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    assert job_id.isdigit(), submit.stdout
    log = run / "slurm" / f"mc-requeue-{job_id}.out"
    base = Path(env["SLURM_CONF"]).parent

    def explain() -> str:
        ctld = base / "log" / "slurmctld.log"
        return (f"job: {_job(env, job_id)}\n--- {log}:\n{log.read_text()[-4000:] if log.exists() else '(none)'}"
                f"\n--- slurmctld.log:\n{ctld.read_text()[-2000:] if ctld.exists() else '(none)'}")

    # 1. Both nodes train; once the first steps are in, SLURM tells the batch script (only it: --batch) to stop.
    _wait("the first steps", lambda: steps_done(run) >= 3 or _job(env, job_id).get("JobState") in
          ("FAILED", "COMPLETED", "CANCELLED"), 240, explain)
    assert _job(env, job_id).get("JobState") == "RUNNING", explain()
    seen = steps_done(run)
    signal = subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], capture_output=True, text=True,
                            env=env, timeout=30)
    assert signal.returncode == 0, signal.stderr

    # 2. The trainers checkpoint and stop; the script requeues the job, which starts again once the credential
    #    lifetime has passed (cred_expire: 10 s on the test cluster, 120 s by default). Forcing it earlier with
    #    `scontrol update StartTime=now` is not safe: slurmd then refuses the job ("Job credential revoked").
    _wait("the requeue", lambda: _job(env, job_id).get("Restarts") == "1", 120, explain)
    _wait("the resumed job to finish", lambda: _job(env, job_id).get("JobState") in
          ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 240, explain)
    job = _job(env, job_id)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", explain()

    # 3. It checkpointed on the request (within the steps in flight), said so, and resumed from that checkpoint.
    assert "got SIGUSR1" in text and "megacrystal: got SIGUSR1: asking the trainers" in text, explain()
    assert f"requeueing job {job_id}" in text and "SLURM_RESTART_COUNT=1" in text, explain()
    resumed = re.search(r"resumed from (\S+)/step_(\d+) at step (\d+)", text)
    assert resumed, explain()
    step = int(resumed.group(3))
    assert seen <= step <= seen + 4 and step < STEPS, (seen, step)
    assert (run / "checkpoints" / f"step_{step:09d}").is_dir() and latest_checkpoint(run) == STEPS
    assert text.count("SLURM_RESTART_COUNT=") == 2 and "training finished" in text

    # 4. The interruption changed nothing: the losses are the uninterrupted single-host run's, bit for bit.
    assert losses(run) == reference_losses
    print(f"SLURM requeue test: {time.time() - started:.0f} s from submission to completion")
