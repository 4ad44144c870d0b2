"""The plots' data and styling (not their pixels): plan against realized, token units, named phases."""
import json
from pathlib import Path

import pytest

from megacrystal.config import load_config
from megacrystal.schedule.from_config import plan_for
from megacrystal.train.plots import (blend_figure, blend_series, format_tokens, phase_spans, val_loss_figure,
                                     weights_figure)
from megacrystal.train.records import EvalRecord, StepRecord

ROOT = Path(__file__).resolve().parents[2]
STEP = 16 * 128  # the tiny config's tokens per step
PHASE_STEPS = 4  # text, mixed (prose .5 / python .3 / web .2), code (python .6 / web .3 / prose .1)


@pytest.fixture(scope="module")
def plan():
    overrides = [f"data.phases.{p}.tokens={PHASE_STEPS * STEP}" for p in ("text", "mixed", "code")]
    return plan_for(load_config(ROOT / "configs" / "crystal-tiny.yaml", overrides))


def _records(plan, drift: int = 0) -> list[StepRecord]:
    """Steps whose samples follow each phase's weights, `drift` python samples moved to web after step 6."""
    out, consumed = [], {"prose": 0, "python": 0, "web": 0}
    for step in range(1, plan.total_steps + 1):
        _, phase, _ = plan.phase_at_step(step - 1)
        samples = {d: round(w * 16) for d, w in phase.weights.items()}
        samples[max(samples, key=samples.get)] += 16 - sum(samples.values())
        if step == 7:
            samples["python"] -= drift
            samples["web"] = samples.get("web", 0) + drift
        for d, n in samples.items():
            consumed[d] += n * 128
        out.append(StepRecord(step=step, phase=phase.name, tokens=step * STEP, loss=8.0 - step / 10, lr=1e-3,
                              grad_norm=1.0, step_time_s=0.1, tokens_per_s=STEP / 0.1, tflops_per_device=0.0,
                              mfu=None, samples=samples, consumed_tokens=dict(consumed),
                              eval=EvalRecord({"prose": 7.0, "web": 6.5}) if step % PHASE_STEPS == 0 else None))
    return out


@pytest.mark.parametrize("n, label", [(0, "0"), (512, "512"), (16384, "16.4K"), (1_000_000, "1M"),
                                      (1_500_000, "1.5M"), (2.5e9, "2.5B"), (300e9, "300B"), (999_999, "1M"),
                                      (1.2e12, "1.2T")])
def test_token_labels_use_k_m_b_units(n, label):
    assert format_tokens(n) == label


def test_planned_and_realized_series_and_their_difference(plan):
    data = blend_series(_records(plan, drift=2), plan)
    p = PHASE_STEPS * STEP  # tokens per phase
    assert data["tokens"] == [0, *range(STEP, 3 * p + 1, STEP)]
    at = {t: i for i, t in enumerate(data["tokens"])}
    prose, python, web = (data["datasets"][d] for d in ("prose", "python", "web"))
    # by hand from the config's weights: the end of text, the middle of mixed, the end of code
    assert prose["planned"][at[p]] == p and python["planned"][at[p]] == 0
    assert prose["planned"][at[p + 2 * STEP]] == pytest.approx(p + 0.5 * 2 * STEP)
    assert web["planned"][at[3 * p]] == pytest.approx(0.2 * p + 0.3 * p)
    assert python["realized"][0] == 0 and python["realized"][at[7 * STEP]] == 128 * (5 + 5 + 5 - 2)
    assert python["deviation"] == [r - q for r, q in zip(python["realized"], python["planned"])]
    assert python["deviation"][at[7 * STEP]] == pytest.approx(-2 * 128 + (5 - 4.8) * 3 * 128)


def test_blend_plot_shows_the_plan_apart_from_the_realized_line_and_names_the_phases(plan):
    fig = blend_figure(_records(plan), plan)
    top, bottom = fig.axes
    lines = {line.get_gid(): line for line in top.lines if line.get_gid()}
    for d in ("prose", "python", "web"):
        planned, realized = lines[f"planned:{d}"], lines[f"realized:{d}"]
        assert planned.get_color() == realized.get_color()
        # a wide translucent band drawn under a thin line: both stay visible where they coincide
        assert planned.get_linewidth() >= 3 * realized.get_linewidth() and planned.get_alpha() < 0.5
        assert planned.get_zorder() < realized.get_zorder()
        assert [line.get_gid() for line in bottom.lines if line.get_gid()].count(f"deviation:{d}") == 1
    assert {"prose", "python", "web", "planned", "realized"} <= {t.get_text() for t in top.get_legend().texts}
    assert [t.get_text() for t in top.texts] == ["text", "mixed", "code"]
    assert phase_spans(plan) == [("text", 0, 4 * STEP), ("mixed", 4 * STEP, 8 * STEP), ("code", 8 * STEP, 12 * STEP)]
    assert top.get_xlim()[0] < 0 and top.get_xlim()[1] > 12 * STEP  # the whole plan, every phase in full
    assert bottom.xaxis.get_major_formatter()(16384, 0) == "16.4K"
    assert top.yaxis.get_major_formatter()(2_000_000, 0) == "2M"


def test_val_loss_plot_has_one_line_per_dataset_and_none_without_evaluations(plan):
    records = _records(plan)
    (ax,) = val_loss_figure(records, plan).axes
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    assert set(lines) == {"val:prose", "val:web"}
    assert list(lines["val:web"].get_xdata()) == [4 * STEP, 8 * STEP, 12 * STEP]
    for r in records:
        r.eval = None
    assert val_loss_figure(records, plan) is None


def test_online_weights_are_plotted_and_become_the_blend_plots_plan(plan):
    records = _records(plan)
    assert weights_figure(records, plan) is None  # no online mixing, no plot
    online = {5: {"prose": 0.5, "python": 0.3, "web": 0.2}, 6: {"prose": 0.5, "python": 0.3, "web": 0.2},
              7: {"prose": 0.25, "python": 0.5, "web": 0.25}, 8: {"prose": 0.25, "python": 0.5, "web": 0.25}}
    for step, weights in online.items():
        records[step - 1].blend_weights = weights
        assert StepRecord.from_json(json.loads(records[step - 1].to_line())).blend_weights == weights
    (ax,) = weights_figure(records, plan).axes
    python = next(line for line in ax.lines if line.get_gid() == "weight:python")
    # a step line: each step's weight from its first token, the phases' fixed weights around the online ones
    assert list(python.get_xdata()) == [*range(0, 12 * STEP, STEP), 12 * STEP]
    assert list(python.get_ydata()) == [0, 0, 0, 0, 0.3, 0.3, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    planned = blend_series(records, plan)["datasets"]["python"]["planned"]
    assert planned[8] == pytest.approx((0.3 * 2 + 0.5 * 2) * STEP) and planned[12] == pytest.approx((1.6 + 2.4) * STEP)
