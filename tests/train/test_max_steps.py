"""train.max_steps stops a phased run with a checkpoint, phase budgets untouched; the next run finishes the plan.
Both runs end with the summary, whose numbers are checked against their metrics.jsonl."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")
PHASES = ("text", "mixed", "code")
PHASE_TOKENS = 4 * 16 * 128  # 4 steps a phase
COMMON = ["--set", "train.threads=1", "--set", "train.log_interval=100", "--set", "checkpoint.keep=1",
          *[a for p in PHASES for a in ("--set", f"data.phases.{p}.tokens={PHASE_TOKENS}")]]

pytestmark = pytest.mark.slow


def _train(run_dir: Path, tiny_data, *extra) -> str:
    out = subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", TINY, "--set", f"run.dir={run_dir}",
                          *tiny_data, *COMMON, *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _summary(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run summary"))
    return lines[start:]


def _table(records: list[dict]) -> dict[str, dict[str, int]]:
    """Tokens per phase and dataset, summed here from each step's samples (128 tokens a sample)."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        for d, n in r["samples"].items():
            out.setdefault(r["phase"], {}).setdefault(d, 0)
            out[r["phase"]][d] += n * 128
    return out


def _check_table(summary: list[str], records: list[dict]) -> None:
    header = summary[1].split()
    assert header[0] == "tokens" and header[-1] == "total"
    table = _table(records)
    for line in summary[2:2 + len(table)]:
        phase, *cells = line.split()
        assert [int(c.replace(",", "")) for c in cells] == \
            [*(table[phase].get(d, 0) for d in header[1:-1]), sum(table[phase].values())], phase
    final = records[-1]["consumed_tokens"]  # the cursors' count, apart from the samples summed above
    total = summary[2 + len(table)].split()
    assert total[0] == "total" and [int(c.replace(",", "")) for c in total[1:-1]] == [final[d] for d in header[1:-1]]


def test_max_steps_stops_with_a_checkpoint_and_the_next_run_finishes_the_plan(tmp_path, tiny_data):
    run = tmp_path / "run"
    first = _train(run, tiny_data, "--set", "train.max_steps=6")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000000006"
    assert (run / "checkpoints" / "step_000000004").is_dir()  # the text phase's end, kept beyond keep=1
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert [resolved["data"]["phases"][p]["tokens"] for p in PHASES] == [PHASE_TOKENS] * 3
    assert "step 6/6" in first  # the progress line of the last step, with the ETA to the stop
    summary = _summary(first)
    assert summary[0] == "run summary (train.max_steps 6 reached): 6 steps, 12,288 tokens"
    _check_table(summary, records)
    assert f"final loss: train {records[-1]['loss']:.4f} (step 6)" in first
    assert f"checkpoint: {run / 'checkpoints' / 'step_000000006'}" in first

    second = _train(run, tiny_data)  # the same command without max_steps: resumes and finishes the plan
    assert "resumed from" in second and "at step 6 (phase mixed)" in second
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["phase"] for r in records] == [p for p in PHASES for _ in range(4)]
    summary = _summary(second)
    assert summary[0] == "run summary (plan complete): 12 steps, 24,576 tokens; this session steps 7-12"
    _check_table(summary, records)
    val = " ".join(f"{d} {v:.4f}" for d, v in records[-1]["val_loss"].items())
    assert f"final loss: train {records[-1]['loss']:.4f} (step 12) | val {val} (step 12)" in second
    session = records[6:]
    rate = sum(r["tokens"] // r["step"] for r in session) / sum(r["step_time_s"] for r in session)
    assert f"wall for 6 steps; {rate:,.0f} tokens/s in steps" in second
    assert {Path(p).name for p in summary[-1].removeprefix("  plots: ").split(", ")} == \
        {"blend.png", "loss.png", "val_loss.png", "loss_per_dataset.png", "val_bpb.png"}
