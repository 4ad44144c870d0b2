"""What the multi-node tests share: the uninterrupted single-host run they must reproduce."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40  # long enough to interrupt a run in the middle: conftest's SYNTHETIC checkpoints every 2 steps


def losses(run_dir: Path) -> list[float]:
    """The per-step losses of a finished run, checking that every step is there once."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), [r["step"] for r in records]
    return [r["loss"] for r in records]


def steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def latest_checkpoint(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


@pytest.fixture(scope="session")
def reference_losses(synthetic_config, tmp_path_factory) -> list[float]:
    """The losses of the tiny synthetic run on one host with 2 processes (`launch/local.sh 2`), uninterrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    out = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", str(synthetic_config),
                          "--set", f"run.dir={run}", "--set", f"train.steps={STEPS}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return losses(run)
