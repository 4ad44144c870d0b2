"""The end-of-run summary's numbers, from a handful of records whose totals are known by hand."""
from pathlib import Path

from megacrystal.train.records import EvalRecord, StepRecord
from megacrystal.train.summary import run_summary, tokens_by_phase

SEQ, BATCH = 32, 4


def _record(step, phase, samples, loss, val=None):
    return StepRecord(step=step, phase=phase, tokens=step * SEQ * BATCH, loss=loss, lr=1e-3, grad_norm=1.0,
                      step_time_s=0.5, tokens_per_s=SEQ * BATCH / 0.5, tflops_per_device=0.0, mfu=None,
                      samples=samples, consumed_tokens={}, eval=EvalRecord(val) if val else None)


RECORDS = [_record(1, "a", {"x": 4}, 5.0), _record(2, "a", {"x": 3, "y": 1}, 4.0, val={"x": 4.5, "y": 4.25}),
           _record(3, "b", {"y": 4}, 3.5), _record(4, "b", {"x": 1, "y": 3}, 3.25)]


def test_tokens_per_phase_and_dataset():
    assert tokens_by_phase(RECORDS) == {"a": {"x": 7 * SEQ, "y": 1 * SEQ}, "b": {"y": 7 * SEQ, "x": 1 * SEQ}}


def test_summary_lines_carry_the_records_numbers():
    text = run_summary(RECORDS, first_step=2, wall_s=10.0, ended="plan complete", checkpoint="/ck/step_000000004",
                       plots=[Path("/run/loss.png")], metrics=Path("/run/metrics.jsonl"))
    lines = text.splitlines()
    assert lines[0] == "run summary (plan complete): 4 steps, 512 tokens; this session steps 3-4"
    assert lines[1].split() == ["tokens", "x", "y", "total"]
    assert lines[2].split() == ["a", "224", "32", "256"]
    assert lines[3].split() == ["b", "32", "224", "256"]
    assert lines[4].split() == ["total", "256", "256", "512"]
    assert "final loss: train 3.2500 (step 4) | val x 4.5000 y 4.2500 (step 2)" in text
    # this session: steps 3 and 4, 256 tokens in 1.0 s of steps and 10 s of wall time
    assert "10s wall for 2 steps; 256 tokens/s in steps (1.0 s), 26 tokens/s over the wall time" in text
    assert "checkpoint: /ck/step_000000004" in text and "/run/loss.png" in text and "/run/metrics.jsonl" in text
