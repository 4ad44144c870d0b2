"""`megacrystal ablate` end to end on a 3-variant grid of a very small model: killed mid-way, rerun, reported."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STEP = 16 * 128

pytestmark = pytest.mark.slow


def _grid(tmp_path: Path, data_dir: str) -> Path:
    grid = {
        "base": str(ROOT / "configs" / "lab" / "code-cooldown.yaml"),
        "set": [f"data.dir={data_dir}", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=172",
                f"data.phases.stable.tokens={4 * STEP}", f"data.phases.cooldown.tokens={2 * STEP}",
                "data.phases.stable.lr.warmup_steps=1", "data.eval_samples=4", "data.eval_interval=100",
                "checkpoint.interval=2", "train.threads=1", "train.log_interval=1"],
        "variants": {"code-00": {"data.phases.stable.weights": {"prose": 1.0, "python": 0.0, "web": 0.0}},
                     "code-25": {"data.phases.stable.weights": {"prose": 0.75, "python": 0.125, "web": 0.125}},
                     "code-50": {"data.phases.stable.weights": {"prose": 0.5, "python": 0.25, "web": 0.25}}},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _ablate(grid: Path, out: Path, **kwargs):
    return [sys.executable, "-m", "megacrystal", "ablate", "--grid", str(grid), "--out", str(out)]


def test_ablate_resumes_after_a_kill_without_retraining_and_reports(tmp_path, tiny_data):
    grid, out = _grid(tmp_path, tiny_data[1].split("=", 1)[1]), tmp_path / "out"
    log = open(tmp_path / "first.log", "w")
    # Its own session: the kill takes the ablate process and the trainer it started, as a node failure would.
    first = subprocess.Popen(_ablate(grid, out), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             start_new_session=True)
    deadline = time.time() + 900
    try:
        while not ((out / "code-00" / "lab-done.json").is_file()
                   and list((out / "code-25" / "checkpoints").glob("step_*"))):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    assert not (out / "code-25" / "lab-done.json").exists()
    finished = (out / "code-00" / "metrics.jsonl").stat().st_mtime_ns

    second = subprocess.run(_ablate(grid, out), capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "variant 1/3 code-00: finished earlier, skipped" in second.stdout
    assert "variant 2/3 code-25: resuming from its checkpoints" in second.stdout
    assert "variant 3/3 code-50: starting" in second.stdout
    assert (out / "code-00" / "metrics.jsonl").stat().st_mtime_ns == finished  # not retrained
    assert "resumed from" in (out / "code-25" / "train.log").read_text()
    for name in ("code-00", "code-25", "code-50"):
        steps = [json.loads(line)["step"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6], name

    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["code-00", "code-25", "code-50"]
    for name, variant in report["variants"].items():
        assert list(variant["phases"]) == ["stable", "cooldown"]
        assert sorted(variant["phases"]["cooldown"]["bpb_per_dataset"]) == ["prose", "python", "web"]
    measured = {r["variant"]: r["measured"] for r in report["fit"]["held_out"]}
    for name, value in measured.items():  # the default target: the mean of the domains' final BPB
        final = report["variants"][name]["phases"]["cooldown"]["bpb_per_dataset"]
        assert value == pytest.approx(sum(final.values()) / 3)
    md = (out / "report.md").read_text()
    assert "| code-25 |" in md and "## Fitted mixture" in md
    for png in ("loss_per_domain.png", "bpb_heatmap.png"):
        assert (out / png).stat().st_size > 10_000
