"""`megacrystal bench --slurm`: a `nodes=1,2` sweep as jobs on a real two-node SLURM cluster (tests/conftest.py's
`slurm_cluster`), a cancelled job reported in one line, and the one-line errors given before anything is submitted.
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megacrystal.cli import main

ROOT = Path(__file__).resolve().parents[2]
SLURM = ["--slurm", "--gpus-per-node", "0", "--cpus-per-node", "1"]


def _bench(config: Path, out: Path, sweep: str, *extra: str) -> list[str]:
    return ["bench", "--config", str(config), "--sweep", sweep, "--steps", "6", "--warmup", "2", "--out", str(out),
            *extra]


@pytest.mark.parametrize("sweep, extra, message", [
    ("nodes=1", ["--slurm"], "bench --slurm: give --gpus-per-node"),
    ("nodes=1", ["--slurm", "--gpus-per-node", "0"], "bench --slurm --gpus-per-node 0: give --cpus-per-node N"),
    ("nodes=1", ["--gpus-per-node", "2"], "bench --gpus-per-node: a SLURM option; add --slurm"),
    ("nodes=1,2", [], "--sweep nodes>1 needs SLURM (--slurm)"),
    ("nodes=0", SLURM, "--sweep nodes=0: give whole numbers of nodes"),
    ("dp=1,2", SLURM, "--sweep dp: with --slurm the data-parallel size is what nodes x processes per node leaves"),
    # 1 node x 1 process cannot hold a tp=2 group: the point, and which node counts would
    ("nodes=1,2;tp=2", SLURM, "bench point nodes1_tp2: 1 node(s) x 1 processes = 1 ranks do not divide into "
                              "tp x pp = 2; sweep nodes in multiples of 2"),
    # 3 data-parallel ranks x micro-batch 2 do not divide the global batch of 8
    ("nodes=1,3", SLURM, "bench point nodes3: train.global_batch_size: 8 is not a multiple of"),
    ("nodes=1", [*SLURM, "--repeat", "2"], "--repeat 2: --slurm jobs run one round (give --repeat 1)"),
    ("nodes=1", [*SLURM, "--host-ceiling"], "--host-ceiling: runs copies side by side on this host; not with --slurm"),
    ("nodes=1", [*SLURM, "--time", "5"], "bench --time 5: a job is told to checkpoint and requeue 300 s"),
    ("nodes=1", ["--slurm", "--gpus-per-node", "8", "--device", "TPU"], "bench --device 'TPU': the nodes' GPU"),
    ("nodes=1", [*SLURM, "--sbatch=qos=high"], "bench point nodes1: --sbatch 'qos=high': give one sbatch option"),
])
def test_bad_slurm_sweeps_are_one_line_errors_before_anything_is_submitted(
        sweep, extra, message, synthetic_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-cluster.conf"))  # a stray sbatch would fail differently
    out = tmp_path / "bench"
    assert main(_bench(synthetic_config, out, sweep, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"megacrystal: error: {message}"), err
    assert not out.exists()  # nothing written, nothing submitted


def _job(env: dict, job_id: str) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


@pytest.mark.slow
def test_a_nodes_sweep_runs_as_one_slurm_job_per_point_and_is_reported(slurm_cluster, synthetic_config, tmp_path):
    out = tmp_path / "bench"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "megacrystal", *_bench(synthetic_config, out, "nodes=1,2"), *SLURM,
                           "--time", "10"], cwd=ROOT, env=slurm_cluster, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    # Both points ran as SLURM jobs, the 2-node one on both nodes, and the report says which jobs they were.
    jobs = report["slurm"]["jobs"]
    assert list(jobs) == ["nodes1", "nodes2"] and all(i.isdigit() for i in jobs.values())
    assert len(set(jobs.values())) == 2
    for name, nodelist in (("nodes1", r"n[12]"), ("nodes2", r"n\[1-2\]")):
        job = _job(slurm_cluster, jobs[name])
        assert job["JobState"] == "COMPLETED" and re.fullmatch(nodelist, job["NodeList"]), job
        assert Path(report["slurm"]["logs"][name]).read_text().count("training finished") == 1
    assert re.search(r"^slurm \dm\d\ds \| .*running: ", done.stdout, re.M), done.stdout  # progress while waiting

    # The same report as a local sweep: world sizes 1 and 2, measured from each point's metrics.jsonl, plots.
    assert [(p["name"], p["world_size"], p["settings"]) for p in report["points"]] == \
        [("nodes1", 1, {"nodes": 1}), ("nodes2", 2, {"nodes": 2})]
    for point in report["points"]:
        assert point["tokens_per_s"] > 0 and point["measured"]["steps_timed"] == 4
    metrics = out / "points" / "nodes2" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 7))
    assert "| nodes2 | 2 |" in (out / "report.md").read_text()
    assert (out / "throughput.png").stat().st_size > 0 and (out / "mfu.png").stat().st_size > 0
    print(f"bench --slurm nodes=1,2: {time.time() - started:.0f} s")


@pytest.mark.slow
def test_a_cancelled_job_stops_the_sweep_with_one_line_naming_point_job_and_log(
        slurm_cluster, synthetic_config, tmp_path):
    out = tmp_path / "bench"
    bench = subprocess.Popen([sys.executable, "-m", "megacrystal", *_bench(synthetic_config, out, "mbs=2"), *SLURM],
                             cwd=ROOT, env=slurm_cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, job_id = time.time() + 120, ""
        while not job_id and time.time() < deadline and bench.poll() is None:
            job_id = subprocess.run(["squeue", "-h", "-n", "bench-mbs2", "-o", "%i"], capture_output=True,
                                    text=True, env=slurm_cluster, timeout=30).stdout.strip()
            time.sleep(0.2)
        assert job_id.isdigit(), bench.communicate(timeout=60)
        subprocess.run(["scancel", job_id], env=slurm_cluster, check=True, timeout=30)
        stdout, stderr = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 2, stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"megacrystal: error: bench point mbs2: SLURM job {job_id} CANCELLED; "
                        rf"{re.escape(str(out))}/points/mbs2/slurm/bench-mbs2-{job_id}\.out: .+", last), stderr
    assert stderr.count("megacrystal: error:") == 1 and not (out / "report.json").exists()


@pytest.mark.slow
def test_a_point_the_cluster_cannot_run_is_refused_before_any_job_is_submitted(
        slurm_cluster, synthetic_config, tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "megacrystal", *_bench(synthetic_config, out, "nodes=1,4;mbs=1"), *SLURM]
    done = subprocess.run(command, cwd=ROOT, env=slurm_cluster, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("megacrystal: error: bench point nodes4_mbs1: SLURM refuses the job (4 node(s)): ") \
        and done.stderr.count("\n") == 1, done.stderr  # the test cluster has two nodes
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%j"], capture_output=True, text=True,
                            env=slurm_cluster, timeout=30).stdout.split()
    assert "bench-nodes1_mbs1" not in queued and not out.exists()  # a job name no other test uses
