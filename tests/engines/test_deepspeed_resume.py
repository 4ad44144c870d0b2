"""A DeepSpeed ZeRO-2 run resumed from its checkpoint reproduces the uninterrupted losses."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(config, run_dir, *extra):
    out = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", str(config), "--set", f"run.dir={run_dir}",
                          "--set", "engine=deepspeed", "--set", "deepspeed.zero_stage=2", "--set", "train.steps=8",
                          *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_zero2_resume_matches_uninterrupted(synthetic_config, tmp_path):
    full = _run(synthetic_config, tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoints" / "step_000000004"
    resumed = _run(synthetic_config, tmp_path / "resumed", "--resume", str(checkpoint))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in resumed] == [full[s] for s in resumed]
