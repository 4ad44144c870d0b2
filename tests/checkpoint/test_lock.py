"""One run per run directory, and a run directory that cannot be written: one line each, before any work."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megacrystal.checkpoint.errors import CheckpointError
from megacrystal.checkpoint.lock import LOCK_NAME, lock_run_dir

ROOT = Path(__file__).resolve().parents[2]


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another process that locks `run_dir` and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from megacrystal.checkpoint.lock import "
                             f"lock_run_dir; lock_run_dir({str(run_dir)!r}); print('locked', flush=True); "
                             "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_run_directory_is_refused(tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(CheckpointError, match=rf"run directory {tmp_path}/run is in use by another run "
                                                  rf"\(pid {holder.pid} on .*\); wait for it to end"):
            lock_run_dir(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert lock_run_dir(tmp_path / "run") == tmp_path / "run" / LOCK_NAME  # free once the holder is gone


@pytest.mark.slow
def test_train_on_a_run_directory_in_use_fails_in_one_line(synthetic_config, tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        out = subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", str(synthetic_config),
                              "--set", f"run.dir={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"megacrystal: error: run directory {tmp_path}/run is in use by another run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_read_only_run_directory_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {out.stderr.decode().strip()}")
    try:
        with pytest.raises(CheckpointError, match=rf"^run directory {ro}/run cannot be used: Read-only file system; "
                                                  "make it writable or choose another run.dir$"):
            lock_run_dir(ro / "run")
    finally:
        subprocess.run(["umount", str(ro)], check=True)
