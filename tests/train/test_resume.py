"""Resuming mid-phase: the same batches and losses; with a changed blend, no sample repeated or skipped."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megacrystal.config import load_config
from megacrystal.data.blend import epoch_order

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")
PHASE_TOKENS = 10 * 16 * 128  # 10 steps per phase; phase 2 ("mixed") is steps 11-20
COMMON = ["--set", "train.threads=1", "--set", "data.log_samples=true", "--set", "checkpoint.interval=4",
          "--set", "checkpoint.keep=20", "--set", "data.eval_interval=100",
          *[a for p in ("text", "mixed", "code") for a in ("--set", f"data.phases.{p}.tokens={PHASE_TOKENS}")]]

pytestmark = pytest.mark.slow


def _train(run_dir: Path, tiny_data, *extra):
    out = subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", TINY,
                          "--set", f"run.dir={run_dir}", *tiny_data, *COMMON, *extra],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _jsonl(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("resume")
    _train(root / "full", tiny_data)
    mid_phase_2 = root / "full" / "checkpoints" / "step_000000016"
    same = _train(root / "same", tiny_data, "--resume", str(mid_phase_2))
    changed = _train(root / "changed", tiny_data, "--resume", str(mid_phase_2),
                     "--set", "data.phases.mixed.weights.prose=0.2", "--set", "data.phases.mixed.weights.python=0.6")
    return {"root": root, "same_stdout": same, "changed_stdout": changed, "tiny_data": tiny_data}


def test_resume_mid_phase_reproduces_samples_and_losses_exactly(runs):
    full = _jsonl(runs["root"] / "full" / "metrics.jsonl")
    same = _jsonl(runs["root"] / "same" / "metrics.jsonl")
    assert sorted(same) == list(range(17, 31))
    assert [same[s]["loss"] for s in same] == [full[s]["loss"] for s in same]  # bit-exact on CPU fp32
    assert [same[s]["consumed_tokens"] for s in same] == [full[s]["consumed_tokens"] for s in same]
    full_ids = _jsonl(runs["root"] / "full" / "samples.jsonl")
    same_ids = _jsonl(runs["root"] / "same" / "samples.jsonl")
    assert [same_ids[s]["samples"] for s in same_ids] == [full_ids[s]["samples"] for s in same_ids]
    assert "resumed from" in runs["same_stdout"] and "at step 16 (phase mixed)" in runs["same_stdout"]


def test_resume_with_new_weights_continues_every_cursor(runs):
    root = runs["root"]
    changed = _jsonl(root / "changed" / "metrics.jsonl")
    assert "blend change" in " ".join(changed[17]["events"]) and "blend change" in runs["changed_stdout"]
    # Phase 2's remaining steps follow the new weights.
    drawn: dict[str, int] = {}
    for step in range(17, 21):
        for dataset, n in changed[step]["samples"].items():
            drawn[dataset] = drawn.get(dataset, 0) + n
    assert drawn["python"] > drawn["prose"]
    # Per dataset, the ids drawn over the whole run (steps 1-16 before, 17-30 after the change) are exactly
    # the first k of that dataset's epoch order: none repeated, none skipped.
    before = _jsonl(root / "full" / "samples.jsonl")
    after = _jsonl(root / "changed" / "samples.jsonl")
    sequence: dict[str, list[int]] = {}
    for step in range(1, 31):
        for dataset, index in (before if step <= 16 else after)[step]["samples"]:
            sequence.setdefault(dataset, []).append(index)
    config = load_config(TINY, [runs["tiny_data"][1]])
    from megacrystal.data.pipeline import open_streams

    _, streams = open_streams(config, "train")
    for dataset, ids in sequence.items():
        size = streams[dataset].num_samples
        assert len(ids) < size  # one epoch: every id must be new
        assert ids == epoch_order(size, config.train.seed, dataset, 0)[:len(ids)], dataset
