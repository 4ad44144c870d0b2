"""Runs that get killed or told to stop: nothing lost beyond the last checkpoint, the same curve after resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megacrystal.train.signals import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12  # tests/conftest.py SYNTHETIC: a checkpoint every 2 steps

pytestmark = pytest.mark.slow


def _command(nproc: int, config: Path, run_dir: Path) -> list[str]:
    args = ["--set", f"run.dir={run_dir}"]
    if nproc == 1:
        return [sys.executable, "-m", "megacrystal", "train", "--config", str(config), *args]
    return ["bash", str(ROOT / "launch" / "local.sh"), str(nproc), str(config), *args]


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


def _start(nproc, config, run_dir):
    return subprocess.Popen(_command(nproc, config, run_dir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes under a torchrun launch, ordered by their RANK: torchrun's own children only, since
    a rank forks checkpoint writers that share its command line and RANK."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            top = psutil.Process(proc.pid)  # launch/local.sh execs megacrystal.launch.torchrun
            launchers = [p for p in [top, *top.children(recursive=True)] if "torchrun" in " ".join(p.cmdline())]
            workers = [p for launcher in launchers for p in launcher.children()
                       if "megacrystal" in " ".join(p.cmdline())]
            ranked = sorted(workers, key=lambda p: int(p.environ().get("RANK", "-1")))
        except psutil.NoSuchProcess:
            continue
        if len(ranked) >= 2:
            return ranked
        time.sleep(0.2)
    raise TimeoutError("no worker processes")


def _wait_for_step(proc, run_dir: Path, step: int) -> int:
    deadline = time.time() + 300
    while _steps_done(run_dir) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.05)
    return _steps_done(run_dir)


def _latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


@pytest.fixture(scope="module")
def config(synthetic_config) -> Path:
    return synthetic_config


def test_sigkill_and_sigterm_of_one_rank_then_resume_reproduce_the_run(config, tmp_path):
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(_command(2, config, reference), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    run = tmp_path / "preempted"
    # 1. SIGKILL rank 1 after step 3: the run dies; at most the steps since the last checkpoint are lost.
    proc = _start(2, config, run)
    _wait_for_step(proc, run, 3)
    _ranks(proc)[1].kill()
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert _latest_step(run) >= 2

    # 2. Relaunch with --resume auto (the default); SIGTERM only rank 1 after step 7: every rank agrees at the
    #    next step boundary, saves, and exits with the documented code.
    proc = _start(2, config, run)
    seen = _wait_for_step(proc, run, 7)
    _ranks(proc)[1].send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED and "saved a checkpoint on a stop request" in stderr, stderr
    assert seen <= _latest_step(run) <= seen + 2  # within one step of the request

    # 3. Resume to the end: the curve is the uninterrupted one, bit for bit.
    final = subprocess.run(_command(2, config, run), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert _losses(run) == _losses(reference)


def test_sigterm_single_process_saves_and_exits_75(config, tmp_path):
    run = tmp_path / "single"
    proc = _start(1, config, run)
    seen = _wait_for_step(proc, run, 3)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert "checkpoint saved, resume with --resume auto" in stderr
    assert seen <= _latest_step(run) <= seen + 1


def test_time_budget_saves_and_exits_75_before_it_runs_out(config, tmp_path):
    run = tmp_path / "budget"
    out = subprocess.run(_command(1, config, run) + ["--set", "checkpoint.time_limit_s=1.0",
                                                      "--set", "train.steps=400"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == EXIT_PREEMPTED, out.stderr
    assert "(time limit)" in out.stderr
    done = _steps_done(run)
    assert 0 < done < 400 and _latest_step(run) == done


def test_sigterm_to_the_launcher_ends_in_a_checkpoint_of_the_last_step_and_exit_75(config, tmp_path):
    """The reported loss: SIGTERM to the launcher. torchrun would signal each rank's process group (megatron's
    checkpoint helpers included) and SIGKILL after 30 s; megacrystal's launcher forwards it to the ranks alone."""
    run = tmp_path / "launcher"
    proc = subprocess.Popen([sys.executable, "-m", "megacrystal.launch.torchrun", "--standalone", "--nproc-per-node",
                             "2", "-m", "megacrystal.launch.worker", "train", "--config", str(config),
                             "--set", f"run.dir={run}", "--set", "train.steps=400"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert "(SIGTERM); checkpoint" in stderr and "relaunch with --resume auto" in stderr
    assert _latest_step(run) == _steps_done(run) >= 3  # the last finished step, nothing lost


# -- stop signals in a loop: every stop ends with a verified checkpoint of the last finished step ----------------
# CI runs two stops per world size (one during a save); the full check is MEGACRYSTAL_STOP_LOOPS=20 (20 per
# world size, docs/operator-inputs.md).
STOP_LOOPS = os.environ.get("MEGACRYSTAL_STOP_LOOPS")


@pytest.mark.parametrize("world_size, stops", [(2, 2), (4, 2)])
def test_stop_signals_at_random_steps_lose_nothing(world_size, stops, tmp_path):
    from tests.helpers import run_on_ranks

    from .stop_runs import stop_loop

    stops = int(STOP_LOOPS or stops)
    result = run_on_ranks(stop_loop, world_size, str(tmp_path), stops, 1000 + world_size,
                          timeout=120 + 60 * stops)[0]
    print(json.dumps(result["events"]))  # with -s: what each stop did
    assert not result["problems"], result
    assert len(result["events"]) == stops
    assert any(e["during_save"] for e in result["events"])
    # Resumed after every stop from the step it stopped at, and to the end: the uninterrupted run, bit for bit.
    stopped, reference = result["losses"]["stopped"], result["losses"]["reference"]
    assert [s for s, _ in stopped] == list(range(1, result["steps"] + 1))
    assert stopped == reference
