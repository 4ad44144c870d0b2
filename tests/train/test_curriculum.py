"""The tiny three-phase curriculum through the real CLI: phase changes, realized blend, eval, plots, torchrun."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")
PHASES = ("text", "mixed", "code")
STEPS_PER_PHASE, BATCH, SEQ = 10, 16, 128
# 160 samples per phase, so "within one sample of plan" also means within 1% of the weights.
SHORT = ["--set", "train.log_interval=5", "--set", "train.threads=1", "--set", "data.eval_interval=100",
         *[a for p in PHASES for a in ("--set", f"data.phases.{p}.tokens={STEPS_PER_PHASE * BATCH * SEQ}")]]

pytestmark = pytest.mark.slow


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("curriculum")
    (root / "single").mkdir()  # an older run's records in the same directory: a fresh run replaces them
    (root / "single" / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 0.0}) + "\n")
    single = subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", TINY,
                             "--set", f"run.dir={root / 'single'}", "--set", "train.profile_steps=[11,12]",
                             "--resume", "none", *tiny_data, *SHORT],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert single.returncode == 0, single.stderr
    piped = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", TINY, "--set",
                            f"run.dir={root / 'pp2'}", "--set", "parallel.pp=2", *tiny_data, *SHORT],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert piped.returncode == 0, piped.stderr
    return {"single": root / "single", "pp2": root / "pp2", "stdout": single.stdout}


def test_run_dir_contract(runs):
    records = _records(runs["single"])
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("step", "phase", "tokens", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s",
                "tflops_per_device", "consumed_tokens", "samples"):
        assert all(key in r for r in records), key
    progress = [line for line in runs["stdout"].splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in progress] == [f"step {n}/30" for n in (5, 10, 15, 20, 25, 30)]
    assert all("tok/s" in line and "ETA" in line for line in progress)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs["single"] / "tensorboard"))
    events.Reload()
    # TensorBoard stores float32: equal to the record's float64 loss within float32's precision.
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    resolved = yaml.safe_load((runs["single"] / "config.resolved.yaml").read_text())
    assert resolved["data"]["phases"]["code"]["tokens"] == STEPS_PER_PHASE * BATCH * SEQ
    assert {p.name for p in runs["single"].glob("*.png")} == {"blend.png", "loss.png", "val_loss.png",
                                                              "loss_per_dataset.png", "val_bpb.png"}
    ops = (runs["single"] / "profile" / "ops_rank0.txt").read_text()  # train.profile_steps=[11,12]
    assert "aten::mm" in ops and "step 11" in ops and "step 12" in ops and "step 13" not in ops
    trace = json.loads((runs["single"] / "profile" / "trace_rank0.json").read_text())
    assert any(e.get("name") == "step 12" for e in trace["traceEvents"])


def test_phases_change_at_their_token_boundaries(runs):
    records = _records(runs["single"])
    boundary = STEPS_PER_PHASE * BATCH * SEQ
    for r in records:
        assert r["phase"] == PHASES[(r["tokens"] - 1) // boundary], r["step"]
    assert "phase text" in runs["stdout"] and "phase code: starting from weights only" in runs["stdout"]


def test_realized_blend_within_one_percent_of_each_phase_weights(runs):
    weights = yaml.safe_load(Path(TINY).read_text())["data"]["phases"]
    records = _records(runs["single"])
    for phase in PHASES:
        counts: dict[str, int] = {}
        for r in records:
            if r["phase"] == phase:
                for dataset, n in r["samples"].items():
                    counts[dataset] = counts.get(dataset, 0) + n
        total = sum(counts.values())
        assert total == STEPS_PER_PHASE * BATCH
        for dataset, weight in weights[phase]["weights"].items():
            assert abs(counts.get(dataset, 0) / total - weight) <= 0.01, (phase, dataset, counts)
    # consumed_tokens is cumulative over the run
    assert sum(records[-1]["consumed_tokens"].values()) == 3 * STEPS_PER_PHASE * BATCH * SEQ


def test_validation_loss_at_every_phase_end(runs):
    evals = [r for r in _records(runs["single"]) if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(set(r["val_loss"]) == {"prose", "python", "web"} for r in evals)


def test_torchrun_pipeline_parallel_run_matches(runs):
    single, piped = _records(runs["single"]), _records(runs["pp2"])
    assert [r["loss"] for r in piped] == pytest.approx([r["loss"] for r in single], rel=1e-5, abs=0)
    assert [r["val_loss"] for r in piped if "val_loss" in r] == \
        [pytest.approx(r["val_loss"], rel=1e-5) for r in single if "val_loss" in r]
