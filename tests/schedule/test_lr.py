"""LR segments: Crystal's three phases (crystal-spec §3.2), cosine decay, validation, shape properties."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacrystal.schedule.lr import LRSegment, lr_at

# Crystal's LR blocks, verbatim from the phase yamls (crystal-spec §3.2); step counts are the phases' max_steps.
PHASE1 = LRSegment(peak=0.012, warmup_steps=86, end=0.00012408, decay_steps=294_337)
PHASE2 = LRSegment(peak=0.0087825, warmup_steps=86, end=0.00013679, decay_steps=214_301)
PHASE3 = LRSegment(peak=0.002, warmup_steps=276, end=0.0002, decay_steps=27_452)
PHASE_STEPS = (79_721, 214_387, 27_728)


def test_crystal_phase1_warmup_and_truncated_decay():
    assert lr_at(PHASE1, 0) == 0.0
    assert lr_at(PHASE1, 43) == pytest.approx(0.006)
    assert lr_at(PHASE1, 86) == pytest.approx(0.012)
    # Phase 1 stops after 79,721 of the 294,423 steps its decay was laid out for (spec: LR at end ≈ 0.0087869).
    assert lr_at(PHASE1, PHASE_STEPS[0], PHASE_STEPS[0]) == pytest.approx(0.0087869, abs=1e-7)
    # The phase-2 peak was chosen to match where phase 1 stopped.
    assert lr_at(PHASE1, PHASE_STEPS[0]) == pytest.approx(PHASE2.peak, rel=1e-3)


def test_crystal_phase2_decays_exactly_to_its_end_at_max_steps():
    assert lr_at(PHASE2, 86) == pytest.approx(0.0087825)
    assert lr_at(PHASE2, PHASE_STEPS[1]) == pytest.approx(0.00013679, abs=1e-15)
    last = lr_at(PHASE2, PHASE_STEPS[1] - 1)
    assert 0.00013679 < last < 0.00013679 + (0.0087825 - 0.00013679) / 214_301 * 1.0001


def test_crystal_phase3_warmup_276_then_decay_over_27452():
    assert lr_at(PHASE3, 0) == 0.0
    assert lr_at(PHASE3, 138) == pytest.approx(0.001)
    assert lr_at(PHASE3, 276) == pytest.approx(0.002)
    assert lr_at(PHASE3, 276 + 13_726) == pytest.approx(0.0011)
    assert lr_at(PHASE3, 276 + 27_452) == pytest.approx(0.0002)
    assert lr_at(PHASE3, 10**6) == pytest.approx(0.0002)


def test_decay_steps_none_decays_over_the_rest_of_the_phase():
    seg = LRSegment(peak=1.0, warmup_steps=10, end=0.0)
    assert lr_at(seg, 10, 110) == 1.0
    assert lr_at(seg, 60, 110) == pytest.approx(0.5)
    assert lr_at(seg, 110, 110) == 0.0
    assert seg.decay_length(110) == 100
    with pytest.raises(ValueError, match="phase_steps"):
        lr_at(seg, 20)


def test_cosine_decay_midpoint_and_ends():
    seg = LRSegment(peak=1.0, warmup_steps=0, end=0.1, decay_steps=100, style="cosine")
    assert lr_at(seg, 0) == pytest.approx(1.0)
    assert lr_at(seg, 50) == pytest.approx(0.55)
    assert lr_at(seg, 100) == pytest.approx(0.1)
    assert lr_at(seg, 25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_nonzero_start_and_zero_decay():
    seg = LRSegment(peak=1.0, warmup_steps=4, end=0.25, decay_steps=0, start=0.2)
    assert lr_at(seg, 0) == pytest.approx(0.2)
    assert lr_at(seg, 2) == pytest.approx(0.6)
    assert lr_at(seg, 4) == 0.25  # no decay steps: straight to `end` after warmup


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(peak=-1.0), "peak"),
        (dict(peak=float("nan")), "peak"),
        (dict(end=-0.1), "end"),
        (dict(start=-0.1), "start"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(warmup_steps=True), "warmup_steps"),
        (dict(decay_steps=-3), "decay_steps"),
        (dict(style="exponential"), "style"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    args = dict(peak=1.0, warmup_steps=1, end=0.0, decay_steps=10)
    with pytest.raises(ValueError, match=f"LRSegment.{field}"):
        LRSegment(**{**args, **kwargs})


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step_in_phase"):
        lr_at(PHASE3, -1)


rates = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    start=rates, peak=rates, end=rates,
    warmup=st.integers(0, 50), decay=st.integers(0, 80),
    style=st.sampled_from(["linear", "cosine"]),
)
def test_schedule_shape(start, peak, end, warmup, decay, style):
    seg = LRSegment(peak=peak, warmup_steps=warmup, end=end, decay_steps=decay, start=start, style=style)
    values = [lr_at(seg, s) for s in range(warmup + decay + 5)]
    eps = 1e-9 * (1 + max(start, peak, end))
    warm, rest = values[:warmup], values[warmup:]
    # Warmup moves monotonically from start toward peak; decay monotonically from peak to end; then flat.
    assert all((b - a) * (peak - start) >= -eps for a, b in zip(warm, warm[1:]))
    assert all((b - a) * (end - peak) >= -eps for a, b in zip(rest, rest[1:]))
    assert all(min(start, peak, end) - eps <= v <= max(start, peak, end) + eps for v in values)
    assert values[-1] == end
    if warmup:
        assert values[0] == start
    if decay:
        assert values[warmup] == pytest.approx(peak)
