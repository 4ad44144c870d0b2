"""Damaged, foreign or missing checkpoints and a full disk: one clear line, nothing overwritten or lost."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def train(config, run_dir, *extra, steps=6):
    return subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", str(config),
                           "--set", f"run.dir={run_dir}", "--set", f"train.steps={steps}", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def one_line_error(out, *fragments):
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("megacrystal: error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_config):
    run_dir = tmp_path_factory.mktemp("ckpt-errors") / "run"
    out = train(synthetic_config, run_dir)
    assert out.returncode == 0, out.stderr
    return run_dir


def _step(run_dir, n):
    return run_dir / "checkpoints" / f"step_{n:09d}"


def test_damaged_shards_are_named_and_auto_falls_back(run, synthetic_config, tmp_path):
    shard = _step(run, 6) / "engine" / "__0_1.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    one_line_error(train(synthetic_config, tmp_path / "a", "--resume", str(_step(run, 6))),
                   "engine/__0_1.distcp is corrupt")
    truncated = _step(run, 4) / "engine" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    one_line_error(train(synthetic_config, tmp_path / "b", "--resume", str(_step(run, 4))),
                   "engine/__0_0.distcp", "truncated")
    (_step(run, 2) / "engine" / "common.pt").unlink()
    one_line_error(train(synthetic_config, tmp_path / "c", "--resume", str(_step(run, 2))),
                   "engine/common.pt", "missing")

    # auto walks back over damaged checkpoints, warning about each, and never starts over silently.
    out = train(synthetic_config, run, "--resume", "auto", steps=6)
    one_line_error(out, "no intact checkpoint")
    assert "step_000000006" in out.stderr and "skips damaged checkpoint" in out.stderr


def test_foreign_or_missing_checkpoints(run, synthetic_config, tmp_path):
    fresh = tmp_path / "fresh"
    assert train(synthetic_config, fresh, steps=2).returncode == 0
    one_line_error(train(synthetic_config, fresh, "--set", "model.num_layers=4", steps=4),
                   "another model", "num_layers")
    one_line_error(train(synthetic_config, tmp_path / "x", "--resume", str(tmp_path)), "not a checkpoint")
    out = train(synthetic_config, fresh, "--resume", "auto", steps=4)  # the matching model resumes
    assert out.returncode == 0 and "resumed from" in out.stdout and "step 2" in out.stdout, out.stderr


def test_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(synthetic_config, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    # Room for one checkpoint (1.2 MB) and a bit, not for a second one.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = train(synthetic_config, tmp_path / "run", "--set", f"checkpoint.dir={mount}", "--set",
                    "checkpoint.keep=5")
        one_line_error(out, "no space left on device", "step_000000002", "is intact")
        from megacrystal.checkpoint import CheckpointStore

        assert CheckpointStore(mount).resolve_resume("auto").name == "step_000000002"
        assert not [p for p in mount.iterdir() if p.name.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)])
