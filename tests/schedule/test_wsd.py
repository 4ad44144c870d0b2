"""WSD (warmup-stable-decay) and cooldown-phase LR schedules, step by step against their closed forms."""
import math

import pytest

from megacrystal.config import ConfigError, load_config
from megacrystal.schedule.from_config import plan_for
from megacrystal.schedule.lr import LRSegment, lr_at
from megacrystal.schedule.plan import PhaseSpec, RunPlan


def _expected_wsd(s: int, n: int, peak: float, end: float, warmup: int, fraction: float, style: str) -> float:
    """The WSD LR written out from its definition (Hägele et al. 2024), independently of lr.py."""
    if s < warmup:
        return peak * s / warmup
    decay = int(fraction * n + 0.5)
    first = n - decay
    if s < first:
        return peak
    t = (s - first) / decay
    shape = {"linear": 1 - t, "cosine": (1 + math.cos(math.pi * t)) / 2, "1-sqrt": 1 - math.sqrt(t)}[style]
    return end + (peak - end) * shape


@pytest.mark.parametrize("style", ["linear", "cosine", "1-sqrt"])
def test_wsd_every_step_matches_the_formula(style):
    n, seg = 100, LRSegment(peak=0.02, warmup_steps=10, end=0.001, decay_fraction=0.2, style=style)
    got = [lr_at(seg, s, n) for s in range(n)]
    want = [_expected_wsd(s, n, 0.02, 0.001, 10, 0.2, style) for s in range(n)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[10:80] == [0.02] * 70  # the stable part holds the peak exactly
    assert got[80] == 0.02 and got[99] < got[98] and lr_at(seg, n, n) == 0.001
    assert seg.decay_window(n) == (80, 20)


def test_one_minus_sqrt_drops_fastest_at_the_start_of_the_decay():
    seg = LRSegment(peak=1.0, warmup_steps=0, end=0.0, style="1-sqrt")
    assert lr_at(seg, 25, 100) == pytest.approx(0.5)  # 1 - sqrt(1/4)
    assert lr_at(seg, 1, 100) == pytest.approx(0.9)  # 1 - sqrt(1/100)
    assert lr_at(seg, 100, 100) == 0.0


def test_decay_fraction_zero_never_decays_and_one_decays_the_whole_phase():
    stable = LRSegment(peak=0.5, warmup_steps=3, end=0.0, decay_fraction=0.0)
    assert [lr_at(stable, s, 10) for s in range(3, 10)] == [0.5] * 7
    whole = LRSegment(peak=0.5, warmup_steps=0, end=0.0, decay_fraction=1.0)
    assert [lr_at(whole, s, 4) for s in range(4)] == [0.5, 0.375, 0.25, 0.125]


def test_decay_fraction_never_cuts_into_warmup():
    seg = LRSegment(peak=1.0, warmup_steps=8, end=0.0, decay_fraction=0.5)
    assert seg.decay_window(10) == (8, 2)
    assert lr_at(seg, 8, 10) == 1.0 and lr_at(seg, 9, 10) == 0.5


def test_decay_fraction_is_validated():
    with pytest.raises(ValueError, match="decay_fraction must be in"):
        LRSegment(peak=1.0, warmup_steps=0, end=0.0, decay_fraction=1.5)
    with pytest.raises(ValueError, match="exclude each other"):
        LRSegment(peak=1.0, warmup_steps=0, end=0.0, decay_fraction=0.5, decay_steps=3)
    with pytest.raises(ValueError, match="phase_steps is required"):
        lr_at(LRSegment(peak=1.0, warmup_steps=0, end=0.0, decay_fraction=0.5), 1)


def test_stable_phase_then_cooldown_phase_with_its_own_blend():
    """Cohere's recipe: a long stable phase at the peak, then a cooldown phase that decays over its whole length."""
    stable = PhaseSpec("stable", 80 * 64, {"text": 0.75, "code": 0.25},
                       LRSegment(peak=0.01, warmup_steps=5, end=0.01, decay_fraction=0.0))
    cooldown = PhaseSpec("cooldown", 20 * 64, {"text": 0.5, "code": 0.5},
                         LRSegment(peak=0.01, warmup_steps=0, end=0.0, style="1-sqrt"))
    plan = RunPlan.build([stable, cooldown], global_batch_size=4, seq_length=16)
    lrs = [plan.lr_at_step(s) for s in range(plan.total_steps)]
    assert lrs[:5] == pytest.approx([0.01 * s / 5 for s in range(5)])
    assert lrs[5:81] == [0.01] * 76  # no jump at the boundary: the cooldown starts from the stable LR
    assert lrs[80:] == pytest.approx([0.01 * (1 - math.sqrt(s / 20)) for s in range(20)])


def test_config_fields_reach_the_plan(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "crystal-tiny.yaml",
                      ["data.phases.text.lr.decay_fraction=0.2", "data.phases.text.lr.style=1-sqrt"])
    plan = plan_for(cfg)
    assert plan.phases[0].lr.decay_fraction == 0.2 and plan.phases[0].lr.style == "1-sqrt"
    assert plan.lr_at_step(119) == 0.01 and plan.lr_at_step(120) == 0.01 and plan.lr_at_step(121) < 0.01
    with pytest.raises(ConfigError, match="decay_fraction"):
        load_config(root / "configs" / "crystal-tiny.yaml",
                    ["data.phases.text.lr.decay_fraction=0.2", "data.phases.text.lr.decay_steps=5"])
