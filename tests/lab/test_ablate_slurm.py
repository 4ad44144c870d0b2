"""`megacrystal ablate --slurm --submit` on the real SLURM test cluster (tests/conftest.py's `slurm_cluster`):
the rendered array job trains its variant on a node, and `--report-only` then reports it like a local run."""
import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from .test_ablate import ROOT, STEP

pytestmark = pytest.mark.slow


def _state(env, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env, timeout=30)
    states = re.findall(r"JobState=(\S+)", out.stdout)
    return states[0] if states else "GONE"


def test_array_job_trains_a_variant_on_the_cluster(slurm_cluster, tiny_data, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs" / "lab" / "code-cooldown.yaml"),
        "set": [tiny_data[1], "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=172",
                f"data.phases.stable.tokens={2 * STEP}", f"data.phases.cooldown.tokens={STEP}",
                "data.phases.stable.lr.warmup_steps=1", "data.eval_samples=4", "data.eval_interval=100",
                "checkpoint.interval=100", "train.threads=1", "train.log_interval=1"],
        "variants": {"code-25": {"data.phases.stable.weights": {"prose": 0.75, "python": 0.125, "web": 0.125}}},
    }))
    out = tmp_path / "out"
    ablate = [sys.executable, "-m", "megacrystal", "ablate", "--grid", str(grid), "--out", str(out)]
    submit = subprocess.run([*ablate, "--slurm", "--submit", "--cpus-per-node", "1", "--time", "10"],
                            capture_output=True, text=True, cwd=ROOT, env=slurm_cluster, timeout=120)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"submitted array job (\d+)", submit.stdout).group(1)
    deadline = time.time() + 600
    while (state := _state(slurm_cluster, job_id)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.time() < deadline, f"array job {job_id} still {state}"
        time.sleep(1)
    logs = "\n".join(p.read_text()[-3000:] for p in (out / "code-25" / "slurm").glob("*.out"))
    assert state in ("COMPLETED", "GONE"), f"array job {job_id} ended {state}:\n{logs}"
    done = json.loads((out / "code-25" / "lab-done.json").read_text())
    assert done, logs
    steps = [json.loads(line) for line in (out / "code-25" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "loss" in r]) == 3

    report = subprocess.run([*ablate, "--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert report.returncode == 0, report.stderr
    results = json.loads((out / "report.json").read_text())
    assert "code-25" in json.dumps(results)
