"""RunPlan: rounding to whole global batches, phase lookup, per-phase LR, validation messages."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacrystal.schedule.lr import LRSegment
from megacrystal.schedule.plan import PhaseSpec, RunPlan

B, S = 2112, 2048
TPS = B * S


def crystal_plan() -> RunPlan:
    """Crystal's three phases with token budgets from crystal-spec §3.2 (weights abbreviated)."""
    return RunPlan.build(
        [
            PhaseSpec("phase1", 79_721 * TPS, {"slimpj_a": 1.0},
                      LRSegment(peak=0.012, warmup_steps=86, end=0.00012408, decay_steps=294_337)),
            PhaseSpec("phase2", 214_387 * TPS, {"slimpj_b": 0.3719, "starcoder": 0.6281},
                      LRSegment(peak=0.0087825, warmup_steps=86, end=0.00013679, decay_steps=214_301), fim_rate=0.9),
            # The phase-3 yaml's own comment: "# Tokens: 119931863040", i.e. 27,727.5 global batches.
            PhaseSpec("phase3", 119_931_863_040, {"python": 0.8, "slimpj": 0.2},
                      LRSegment(peak=0.002, warmup_steps=276, end=0.0002, decay_steps=27_452),
                      fim_rate=0.3, weights_only_start=True),
        ],
        global_batch_size=B,
        seq_length=S,
    )


def test_crystal_steps_match_max_steps_with_half_up_rounding():
    plan = crystal_plan()
    assert plan.steps == (79_721, 214_387, 27_728)
    assert plan.total_steps == 321_836
    r3 = plan.rounding[2]
    assert (r3.requested_tokens, r3.realized_tokens, r3.steps) == (119_931_863_040, 27_728 * TPS, 27_728)
    assert r3.delta_tokens == TPS // 2
    assert [r.delta_tokens for r in plan.rounding[:2]] == [0, 0]


def test_report_lists_each_phase_and_the_rounding():
    report = crystal_plan().report()
    assert "tokens per step = 2,112 x 2,048 = 4,325,376" in report
    for text in ("phase1", "phase2", "phase3", "total", "119,931,863,040", "+2,162,688", "[79,721, 294,108)"):
        assert text in report


def test_boundaries_and_phase_lookup():
    plan = crystal_plan()
    b = plan.boundaries()
    assert [(x.start_step, x.end_step) for x in b] == [(0, 79_721), (79_721, 294_108), (294_108, 321_836)]
    assert b[1].start_token == 79_721 * TPS and b[2].end_token == plan.total_tokens
    assert plan.phase_at_step(0)[::2] == (0, 0)
    assert plan.phase_at_step(79_720)[::2] == (0, 79_720)
    index, spec, in_phase = plan.phase_at_step(79_721)
    assert (index, spec.name, in_phase) == (1, "phase2", 0)
    assert plan.phase_at_step(321_835)[::2] == (2, 27_727)
    assert plan.phase_index("phase3") == 2
    for bad in (-1, 321_836):
        with pytest.raises(ValueError, match="outside"):
            plan.phase_at_step(bad)


def test_lr_rewarms_at_each_phase_start():
    plan = crystal_plan()
    assert plan.lr_at_step(86) == pytest.approx(0.012)
    assert plan.lr_at_step(79_720) == pytest.approx(0.0087869, abs=1e-6)
    assert plan.lr_at_step(79_721) == 0.0
    assert plan.lr_at_step(79_721 + 86) == pytest.approx(0.0087825)
    assert plan.lr_at_step(294_108) == 0.0
    assert plan.lr_at_step(294_108 + 276) == pytest.approx(0.002)
    assert plan.lr_at_step(321_835) == pytest.approx(0.0002, rel=1e-3)


def test_decay_over_the_rest_of_the_phase_uses_the_rounded_length():
    seg = LRSegment(peak=1.0, warmup_steps=2, end=0.0)
    plan = RunPlan.build([PhaseSpec("only", 12 * 8, {"a": 1.0}, seg)], global_batch_size=4, seq_length=2)
    assert plan.steps == (12,)
    assert plan.lr_at_step(7) == pytest.approx(0.5)


def phase(name="p", tokens=100, weights=None, **kw) -> PhaseSpec:
    return PhaseSpec(name, tokens, {"a": 0.5, "b": 0.5} if weights is None else weights,
                     LRSegment(peak=1e-3, warmup_steps=1, end=1e-4), **kw)


@pytest.mark.parametrize(
    "phases, pattern",
    [
        ([phase(weights={"a": 1.2, "arxiv": -0.2})], r"phase 'p'.*'arxiv'.*negative"),
        ([phase(weights={"a": 0.5, "c4": 0.4})], r"phase 'p'.*'a', 'c4'.*sum to 0\.9.*renormalize"),
        ([phase(weights={})], r"phase 'p'.*empty"),
        ([phase(weights={"a": 0.0})], r"phase 'p'.*all weights are 0"),
        ([phase(weights={"a": float("nan")})], r"phase 'p'.*'a'.*finite"),
        ([phase(tokens=0)], r"phase 'p'.*tokens"),
        ([phase(tokens=-5)], r"phase 'p'.*tokens"),
        ([phase(name="x"), phase(name="x")], r"phase 'x' appears twice"),
        ([phase(fim_rate=1.5)], r"phase 'p'.*fim_rate"),
        ([], r"at least one phase"),
    ],
)
def test_validation_names_phase_and_dataset(phases, pattern):
    with pytest.raises(ValueError, match=pattern):
        RunPlan.build(phases, global_batch_size=4, seq_length=8)


@pytest.mark.parametrize("b, s", [(0, 8), (4, 0), (-1, 8), (4.0, 8)])
def test_batch_and_sequence_must_be_positive_integers(b, s):
    with pytest.raises(ValueError, match="global_batch_size|seq_length"):
        RunPlan.build([phase()], global_batch_size=b, seq_length=s)


def test_renormalize_and_tolerance():
    plan = RunPlan.build([phase(weights={"a": 2.0, "b": 6.0})], 4, 8, renormalize=True)
    assert plan.phases[0].weights == {"a": 0.25, "b": 0.75}
    # Within 1e-6 the weights are accepted and still normalized exactly.
    plan = RunPlan.build([phase(weights={"a": 0.5, "b": 0.5000005})], 4, 8)
    assert math.fsum(plan.phases[0].weights.values()) == pytest.approx(1.0, abs=1e-15)


phase_lists = st.lists(
    st.tuples(
        st.integers(1, 10**7),
        st.dictionaries(st.sampled_from("abcdef"), st.floats(0.0, 1.0), min_size=1).filter(
            lambda w: sum(w.values()) > 1e-3),
    ),
    min_size=1, max_size=5,
)


@settings(max_examples=80, deadline=None)
@given(phase_lists, st.integers(1, 64), st.integers(1, 4096), st.data())
def test_rounding_and_lookup_properties(specs, b, s, data):
    phases = [PhaseSpec(f"p{i}", tokens, weights, LRSegment(peak=1.0, warmup_steps=3, end=0.1))
              for i, (tokens, weights) in enumerate(specs)]
    plan = RunPlan.build(phases, b, s, renormalize=True)
    tps = b * s
    for r in plan.rounding:
        assert r.realized_tokens == r.steps * tps
        if r.steps > 1:
            # Half up: the realized budget is within half a global batch, ties rounding up.
            assert -tps < 2 * r.delta_tokens <= tps
        else:
            assert r.requested_tokens * 2 < 3 * tps
    bounds = plan.boundaries()
    assert bounds[0].start_step == 0 and bounds[-1].end_step == plan.total_steps
    assert all(x.end_step == y.start_step for x, y in zip(bounds, bounds[1:]))
    for spec in plan.phases:
        assert math.fsum(spec.weights.values()) == pytest.approx(1.0, abs=1e-12)
    step = data.draw(st.integers(0, plan.total_steps - 1))
    index, spec, in_phase = plan.phase_at_step(step)
    assert bounds[index].start_step <= step < bounds[index].end_step
    assert spec is plan.phases[index] and in_phase == step - bounds[index].start_step
    assert plan.lr_at_step(bounds[index].start_step) == 0.0
