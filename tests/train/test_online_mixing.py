"""Online mixing in real training runs on the tiny curriculum (text fixed, mixed by DoReMi's rule, code by ODM's):

- 1 process, DP=2, TP=2 and PP=2 give the same weights and losses (to 1e-5; the weights are equal outright);
- stopping at train.max_steps mid-window and resuming, twice, and a SIGKILL of the CLI mid-run and its rerun
  from the last checkpoint, reproduce the uninterrupted run bit for bit;
- the weights are logged per step and plotted, and every segment's draws stay exact.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.ranks import run_on_ranks
from tests.train.online_runs import TINY, train_sessions

ROOT = Path(__file__).resolve().parents[2]

STEP = 8 * 32  # tokens per step at the shape below
STEPS = {"text": 2, "mixed": 12, "code": 6}
OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.ffn_hidden_size=96",
    "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.threads=1",
    "train.log_interval=100", "data.eval_interval=1000", "data.eval_samples=2", "checkpoint.phase_end=false",
    *[f"data.phases.{p}.tokens={n * STEP}" for p, n in STEPS.items()],
    *[f"data.phases.{p}.lr.warmup_steps=1" for p in STEPS],
    "data.phases.mixed.mixing.every=3", "data.phases.mixed.mixing.eta=20", "data.phases.mixed.mixing.epsilon=0.1",
    "data.phases.code.mixing.rule=exp3", "data.phases.code.mixing.every=2", "data.phases.code.mixing.eta=2",
    "data.phases.code.mixing.reference=none", "data.phases.code.mixing.smoothing=0.5",
]
LAYOUTS = {"dp2": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}

pytestmark = pytest.mark.slow


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _killed_and_rerun(run_dir: Path, overrides: list[str]) -> str:
    """Run the CLI with a checkpoint every 5 steps, SIGKILL its session once step 11 is logged (the last
    checkpoint then holds step 10: mid-window in mixed), rerun the same command; return the rerun's stdout."""
    sets = [a for o in [f"run.dir={run_dir}", *overrides, "checkpoint.interval=5"] for a in ("--set", o)]
    command = [sys.executable, "-m", "megacrystal", "train", "--config", TINY, *sets]
    log = run_dir.parent / f"{run_dir.name}.stderr"  # a file, not a pipe nobody drains while it runs
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.time() + 300
    while _logged(run_dir) < 11:
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, "the run did not reach step 11"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the run's own session: it and any helper it started
    proc.wait()
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    return rerun.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("online")
    base = [tiny_data[1], *OVERRIDES]
    # Stops after step 9 (mid-window in mixed) and 15 (the first step of code), then finishes.
    single = run_on_ranks(train_sessions, 1, [
        (str(root / "single"), base),
        (str(root / "stopped"), [*base, "train.max_steps=9"]),
        (str(root / "stopped"), [*base, "train.max_steps=15"]),
        (str(root / "stopped"), base)])[0]
    pair = run_on_ranks(train_sessions, 2, [(str(root / name), [*base, *extra]) for name, extra in LAYOUTS.items()])
    killed = _killed_and_rerun(root / "killed", base)
    return {"root": root, "single": single, "pair": pair, "killed": killed}


def test_weights_move_and_are_logged_plotted_and_exact(runs):
    root = runs["root"]
    records = _records(root / "single")
    assert [r["step"] for r in records] == list(range(1, 21))
    weights = [r.get("blend_weights") for r in records]
    assert weights[:2] == [None, None]  # the text phase keeps its weights and logs none
    assert weights[2:5] == [{"prose": 0.5, "python": 0.3, "web": 0.2}] * 3  # the first window: the configured ones
    mixed, code = weights[2:14], weights[14:]
    assert len({json.dumps(w) for w in mixed}) == 4 and len({json.dumps(w) for w in code}) == 3  # every update moved
    assert all(w == mixed[3 * (k // 3)] for k, w in enumerate(mixed)) and \
        all(w == code[2 * (k // 2)] for k, w in enumerate(code))
    assert code[0] == {"python": 0.6, "web": 0.3, "prose": 0.1}  # each online phase starts from its own weights
    assert all(sum(w.values()) == 1 and all((v * 1024).is_integer() for v in w.values()) for w in mixed[3:] + code[2:])
    assert (root / "single" / "blend_weights.png").stat().st_size > 0
    # Every segment stays within one sample of its weights; segments add up to each phase's realized blend,
    # and the cursors' counts to the samples each step logged.
    state = json.loads(next((root / "single" / "checkpoints").glob("step_000000020/trainer_state.json")).read_text())
    sampler = state["data"]
    segments = sampler["segments"] + [{"phase": "code", "start_step": sampler["phase"]["segment_start_step"],
                                       "end_step": 20, "weights": sampler["phase"]["weights"],
                                       "drawn": sampler["phase"]["segment_drawn"]}]
    assert [(s["phase"], s["start_step"], s["end_step"]) for s in segments] == \
        [("mixed", 2, 5), ("mixed", 5, 8), ("mixed", 8, 11), ("mixed", 11, 14), ("code", 14, 16), ("code", 16, 18),
         ("code", 18, 20)]
    for s in segments:
        logged = Counter()
        for r in records[s["start_step"]:s["end_step"]]:
            logged.update(r["samples"])
            assert r["blend_weights"] == s["weights"]
        assert s["drawn"] == {d: logged[d] for d in s["drawn"]}
        slots = 8 * (s["end_step"] - s["start_step"])
        assert all(abs(logged[d] - w * slots) <= 1 for d, w in s["weights"].items())
    for phase in ("mixed", "code"):
        assert sampler["realized"][phase] == dict(sum((Counter(s["drawn"]) for s in segments if s["phase"] == phase),
                                                      Counter()))
    total = Counter()
    for r in records:
        total.update(r["samples"])
    assert records[-1]["consumed_tokens"] == {d: 32 * n for d, n in total.items()}


def test_stop_and_resume_reproduce_the_run_bit_for_bit(runs):
    root = runs["root"]
    single, stopped = _records(root / "single"), _records(root / "stopped")
    for key in ("loss", "blend_weights", "loss_per_dataset", "samples", "consumed_tokens", "grad_norm"):
        assert [r.get(key) for r in stopped] == [r.get(key) for r in single], key
    sessions = runs["single"][1:]
    assert [[step for step, _, _ in s] for s in sessions] == [list(range(1, 10)), list(range(10, 16)),
                                                                 list(range(16, 21))]


def test_a_killed_run_resumes_from_its_last_checkpoint_bit_for_bit(runs):
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", runs["killed"]).group(1))
    assert resumed in (10, 15)  # the last checkpoint before the kill, taken mid-window
    killed, single = _records(runs["root"] / "killed"), _records(runs["root"] / "single")
    for key in ("step", "loss", "blend_weights", "loss_per_dataset", "samples", "consumed_tokens", "grad_norm"):
        assert [r.get(key) for r in killed] == [r.get(key) for r in single], key


def test_layouts_give_the_same_weights_and_losses(runs):
    root = runs["root"]
    single = _records(root / "single")
    assert runs["pair"][0] == runs["pair"][1]  # both ranks of each layout saw the same losses and weights
    for layout in LAYOUTS:
        got = _records(root / layout)
        assert [r.get("blend_weights") for r in got] == [r.get("blend_weights") for r in single], layout
        assert [r["samples"] for r in got] == [r["samples"] for r in single], layout
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in single], rel=1e-5, abs=0), layout
        for a, b in zip(got, single):
            assert a["loss_per_dataset"] == pytest.approx(b["loss_per_dataset"], rel=1e-5, abs=0), (layout, a["step"])
        diff = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(got, single))
        print(f"{layout}: max relative loss difference to 1 process {diff:.2e}")


def test_the_lab_report_mixture_counts_what_online_phases_drew(runs):
    """The fit's input: a fixed phase counts its weights, an online phase the samples it logged per step."""
    from megacrystal.config import load_config
    from megacrystal.lab.report import mixture, variant_results
    from megacrystal.schedule.from_config import plan_for

    run = runs["root"] / "single"
    records = _records(run)
    plan = plan_for(load_config(run / "config.resolved.yaml"))
    expected = Counter()
    for phase, bounds in zip(plan.phases, plan.boundaries()):
        share = (bounds.end_step - bounds.start_step) / plan.total_steps
        drawn = sum((Counter(r["samples"]) for r in records[bounds.start_step:bounds.end_step]), Counter())
        weights = phase.weights if phase.mixing is None else {d: n / drawn.total() for d, n in drawn.items()}
        for name, w in weights.items():
            expected[name] += w * share
    got = variant_results(run)["mixture"]
    assert got == pytest.approx(dict(expected), rel=1e-12)
    assert got != pytest.approx(mixture(plan), rel=1e-3)  # the configured weights would tell another mixture
