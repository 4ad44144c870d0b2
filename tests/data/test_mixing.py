"""Online mixing: the rules against their formulas written out here, and the sampler's accounting and resume
across many weight changes."""
import json
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from megacrystal.data.blend import BlendedSampler
from megacrystal.data.errors import DataError
from megacrystal.data.mixing import OnlineMixer, eg_step, exp3_weights, quantize
from megacrystal.schedule.lr import LRSegment
from megacrystal.schedule.plan import MixingSpec, PhaseSpec, RunPlan
from tests.data.test_blend import assert_walks_epoch_orders, run

SEQ, B = 4, 8
LR = LRSegment(peak=1e-3, warmup_steps=1, end=1e-4)
SIZES = {"a": 37, "b": 23, "c": 11}


# -- the rules ---------------------------------------------------------------------------------------------------
def reference_quantize(w: np.ndarray, grid: int) -> np.ndarray:
    """Largest remainder: floors of w * grid, then one more unit to the largest remainders (ties: lower index)."""
    scaled = w / w.sum() * grid
    units = np.floor(scaled).astype(int)
    order = np.argsort(-(scaled - units), kind="stable")
    units[order[:grid - units.sum()]] += 1
    return units / grid


def reference_run(spec: MixingSpec, initial: dict, windows: list[dict]) -> list[np.ndarray]:
    """The weights after each window of {dataset: (loss sum, tokens)}, as DoReMi / ODM write the rules."""
    names = sorted(initial)
    n = len(names)
    w = np.array([initial[d] for d in names])
    smoothed = np.full(n, np.nan)
    fixed = not isinstance(spec.reference, str)
    ref = np.array([spec.reference[d] for d in names]) if fixed else np.full(n, 0.0 if spec.reference == "none"
                                                                                else np.nan)
    out = []
    for k, window in enumerate(windows):
        epsilon = spec.epsilon
        if spec.exploration == "decay":  # ODM's Exp3 updater: eps_t = min(1/K, sqrt(ln K / (K t))), a K * eps_t share
            eps_t = min(1 / n, math.sqrt(math.log(n) / (n * (k + 1) * spec.every)))
            epsilon = max(spec.epsilon, n * eps_t)
        for i, d in enumerate(names):
            loss, tokens = window.get(d, (0.0, 0.0))
            if tokens:
                mean = loss / tokens
                before = smoothed[i]
                smoothed[i] = mean if np.isnan(before) else spec.smoothing * before + (1 - spec.smoothing) * mean
                if np.isnan(ref[i]):
                    ref[i] = smoothed[i]
        excess = np.nan_to_num(smoothed - ref, nan=0.0)
        if fixed:
            excess = np.maximum(excess, 0.0)
        if spec.rule == "eg":
            moved = w * np.exp(spec.eta * excess)
        else:
            moved = np.exp(spec.eta * excess - np.max(spec.eta * excess))
        w = reference_quantize((1 - epsilon) * moved / moved.sum() + epsilon / n, spec.grid)
        out.append(w)
    return out


def test_eg_step_is_doremis_update():
    w, e = {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.1, "b": -0.4, "c": 1.3}
    got = eg_step(w, e, eta=0.7, epsilon=0.1)
    raw = {d: w[d] * math.exp(0.7 * e[d]) for d in w}
    want = {d: 0.9 * raw[d] / sum(raw.values()) + 0.1 / 3 for d in w}
    assert got == pytest.approx(want, rel=1e-14)
    assert eg_step({"a": 0.0, "b": 1.0}, {"a": 5.0, "b": 0.0}, 1.0, 0.2) == pytest.approx({"a": 0.1, "b": 0.9})


def test_exp3_weights_are_a_softmax_mixed_with_uniform():
    r = {"a": 7.2, "b": 6.1, "c": 900.0}  # a large reward must not overflow
    got = exp3_weights(r, eta=0.5, epsilon=0.3)
    z = np.exp(0.5 * (np.array(list(r.values())) - 900.0))
    assert list(got.values()) == pytest.approx(list(0.7 * z / z.sum() + 0.1), rel=1e-14)


@pytest.mark.parametrize("grid", [2, 3, 10, 1024, 2**20])
def test_quantize_rounds_to_the_grid_and_sums_to_one(grid):
    rng = np.random.default_rng(grid)
    for _ in range(200):
        w = rng.dirichlet(np.ones(rng.integers(2, 7)))
        names = [f"d{i}" for i in range(len(w))]
        got = quantize(dict(zip(names, w.tolist())), grid)
        assert list(got.values()) == reference_quantize(w, grid).tolist()
        assert sum(Fraction(v).limit_denominator(grid) for v in got.values()) == 1
        assert all(abs(got[d] - x) < 1 / grid for d, x in zip(names, w))


@pytest.mark.parametrize("spec", [
    MixingSpec(rule="eg", eta=2.0, every=2, epsilon=0.05, reference="first"),
    MixingSpec(rule="eg", eta=1.0, every=3, epsilon=0.0, smoothing=0.5, reference={"a": 3.0, "b": 2.5, "c": 2.0}),
    MixingSpec(rule="exp3", eta=0.8, every=1, epsilon=0.2, smoothing=0.3, reference="none", grid=4096),
    MixingSpec(rule="exp3", eta=3.0, every=1, epsilon=0.0, exploration="decay", reference="none", grid=2**20),
    MixingSpec(rule="eg", eta=2.0, every=2, epsilon=0.25, exploration="decay", reference="first"),
], ids=["eg-first", "eg-reference-clipped", "exp3-none-smoothed", "exp3-odm-decay", "eg-decay-floor"])
def test_mixer_follows_the_rule_over_many_windows(spec):
    initial = {"a": 0.5, "b": 0.3, "c": 0.2}
    rng = np.random.default_rng(7)
    mixer, windows, got = OnlineMixer(spec, initial), [], []
    for k in range(12):
        window: dict = {}
        for _ in range(spec.every):
            step = {d: (float(rng.uniform(1.5, 4.0)) * 32 * (1 - 0.02 * k), 32.0) for d in initial
                    if not (d == "c" and k in (2, 3))}  # c has no rows in windows 2 and 3
            for d, (loss, tokens) in step.items():
                acc = window.setdefault(d, [0.0, 0.0])
                acc[0] += loss
                acc[1] += tokens
            due = mixer.observe(step)
        assert due
        windows.append(window)
        got.append(list(mixer.update().values()))
    want = reference_run(spec, initial, windows)
    assert got == [w.tolist() for w in want]
    assert len({tuple(w) for w in got}) > 3  # the weights do move


def test_decaying_exploration_shrinks_to_its_floor():
    from megacrystal.data.mixing import uniform_share

    odm = MixingSpec(epsilon=0.0, exploration="decay")
    shares = [uniform_share(odm, 3, t) for t in (1, 3, 4, 100, 10_000)]
    assert shares[:2] == [1.0, 1.0] and shares[2] == pytest.approx(math.sqrt(3 * math.log(3) / 4))
    assert shares == sorted(shares, reverse=True) and shares[-1] < 0.02
    assert uniform_share(MixingSpec(epsilon=0.1, exploration="decay"), 3, 10_000) == 0.1
    assert uniform_share(MixingSpec(epsilon=0.1), 3, 1) == 0.1


def test_excess_over_a_reference_model_is_clipped_at_zero():
    spec = MixingSpec(every=1, epsilon=0.0, reference={"a": 2.0, "b": 2.0})
    mixer = OnlineMixer(spec, {"a": 0.5, "b": 0.5})
    mixer.observe({"a": (1.0 * 10, 10.0), "b": (3.0 * 10, 10.0)})
    assert mixer.update() == quantize({"a": 1.0, "b": math.exp(1.0)}, 1024)
    assert mixer.excess() == {"a": 0.0, "b": 1.0}


def test_mixer_state_round_trips_through_json():
    spec = MixingSpec(rule="exp3", every=2, smoothing=0.4, reference="first")
    mixer = OnlineMixer(spec, {"a": 0.6, "b": 0.4})
    for k in range(5):
        mixer.observe({"a": (2.0 + k / 3, 1.0), "b": (2.5 - k / 7, 1.0)}) and mixer.update()
    copy = OnlineMixer.from_state(json.loads(json.dumps(mixer.state_dict())))
    assert copy.state_dict() == mixer.state_dict()
    for m in (mixer, copy):
        m.observe({"a": (1.1, 1.0), "b": (1.3, 1.0)})
    assert copy.update() == mixer.update()
    with pytest.raises(DataError, match="online mixing state is incomplete"):
        OnlineMixer.from_state({"spec": spec.to_json()})


# -- the sampler ---------------------------------------------------------------------------------------------------
def online_plan(mixed=MixingSpec(every=2, eta=3.0, epsilon=0.1), code=MixingSpec(rule="exp3", every=3,
                                                                                   reference="none")) -> RunPlan:
    phases = [PhaseSpec("text", 3 * B * SEQ, {"a": 0.6, "b": 0.4}, LR),
              PhaseSpec("mixed", 13 * B * SEQ, {"a": 0.5, "b": 0.3, "c": 0.2}, LR, mixing=mixed),
              PhaseSpec("code", 7 * B * SEQ, {"a": 0.1, "b": 0.6, "c": 0.3}, LR, mixing=code)]
    return RunPlan.build(phases, B, SEQ)


def row_sums(batch, step: int) -> dict[str, tuple[float, float]]:
    """A made-up training loss per row: datasets differ, and a falls fastest."""
    base = {"a": 3.0 - 0.08 * step, "b": 3.5 - 0.02 * step, "c": 4.0 - 0.05 * step}
    sums: dict = {}
    for name, index in batch:
        acc = sums.setdefault(name, [0.0, 0.0])
        acc[0] += SEQ * (base[name] + 0.01 * (index % 5))
        acc[1] += SEQ
    return {d: tuple(v) for d, v in sums.items()}


def drive(sampler: BlendedSampler, steps: range) -> tuple[list, list]:
    """Draw and observe each step as the loop does; (batches, the weights each batch was drawn with)."""
    batches, weights = [], []
    for step in steps:
        batch = sampler.global_batch(step)
        batches.append(batch)
        weights.append(sampler.mixing_weights)
        sampler.observe(step, row_sums(batch, step))
    return batches, weights


def test_every_weight_change_keeps_the_accounting_exact():
    plan = online_plan()
    sampler = BlendedSampler(SIZES, plan, seed=11)
    batches, weights = drive(sampler, range(plan.total_steps))
    segments = sampler.segments()
    assert [s["phase"] for s in segments].count("mixed") >= 5 and [s["phase"] for s in segments].count("code") == 3
    for s in segments:  # each segment within one sample of its weights, counted from the batches themselves
        drawn = Counter(name for batch in batches[s["start_step"]:s["end_step"]] for name, _ in batch)
        slots = (s["end_step"] - s["start_step"]) * B
        assert s["drawn"] == {d: drawn[d] for d in s["drawn"]}
        assert all(abs(drawn[d] - w * slots) <= 1 for d, w in s["weights"].items())
        assert all(weights[k] == s["weights"] for k in range(s["start_step"], s["end_step"]))
    for phase in ("mixed", "code"):
        summed = Counter()
        for s in segments:
            if s["phase"] == phase:
                summed.update(s["drawn"])
        assert sampler.realized_blend()[phase] == dict(summed)
    # The cursors walk each dataset's epoch orders across all changes; consumed counts are the batches'.
    assert_walks_epoch_orders(batches, SIZES, 11)
    assert sampler.consumed_samples() == dict(Counter(name for batch in batches for name, _ in batch))
    assert weights[:3] == [None] * 3  # a phase with fixed weights reports none


def test_an_online_phase_draws_as_a_fixed_one_until_its_first_update():
    fixed = RunPlan.build([PhaseSpec("p", 6 * B * SEQ, {"a": 0.5, "b": 0.3, "c": 0.2}, LR)], B, SEQ)
    online = RunPlan.build([PhaseSpec("p", 6 * B * SEQ, {"a": 0.5, "b": 0.3, "c": 0.2}, LR,
                                      mixing=MixingSpec(every=4))], B, SEQ)
    assert drive(BlendedSampler(SIZES, online, 3), range(4))[0] == run(BlendedSampler(SIZES, fixed, 3), range(4))


def test_resume_at_every_step_reproduces_weights_and_batches():
    plan = online_plan()
    reference = BlendedSampler(SIZES, plan, seed=5)
    expected = drive(reference, range(plan.total_steps))
    for k in range(plan.total_steps + 1):
        first = BlendedSampler(SIZES, plan, seed=5)
        head = drive(first, range(k))
        resumed = BlendedSampler(SIZES, plan, seed=5)
        assert resumed.load_state_dict(json.loads(json.dumps(first.state_dict()))) is None
        tail = drive(resumed, range(k, plan.total_steps))
        assert (head[0] + tail[0], head[1] + tail[1]) == expected, k
        assert resumed.state_dict() == reference.state_dict()


def test_resume_with_other_mixing_options_is_a_reported_blend_change():
    plan = online_plan()
    first = BlendedSampler(SIZES, plan, seed=5)
    drive(first, range(8))
    saved = json.loads(json.dumps(first.state_dict()))
    other = online_plan(mixed=MixingSpec(every=2, eta=0.5, epsilon=0.1))
    resumed = BlendedSampler(SIZES, other, seed=5)
    change = resumed.load_state_dict(saved)
    assert change is not None and change.step == 8 and change.new_weights == {"a": 0.5, "b": 0.3, "c": 0.2}
    assert "mixing online eg (eta 3," in change.describe() and "-> online eg (eta 0.5," in change.describe()
    drive(resumed, range(8, other.total_steps))  # the phase mixes again from its weights, with the new options
    static = RunPlan.build([PhaseSpec(p.name, n * B * SEQ, p.weights, LR) for p, n in zip(plan.phases, plan.steps)],
                           B, SEQ)
    change = BlendedSampler(SIZES, static, seed=5).load_state_dict(saved)
    assert change is not None and "-> static" in change.describe()
    decaying = online_plan(mixed=MixingSpec(every=2, eta=3.0, exploration="decay"))
    change = BlendedSampler(SIZES, decaying, seed=5).load_state_dict(saved)
    assert change is not None and "decaying as ODM's" in change.describe()


def test_a_state_saved_before_an_option_existed_resumes_with_its_default():
    plan = online_plan()
    first = BlendedSampler(SIZES, plan, seed=5)
    drive(first, range(8))
    saved = json.loads(json.dumps(first.state_dict()))
    mixer = saved["phase"]["mixer"]
    assert mixer["spec"].pop("exploration") == "fixed"  # as written before the option existed
    resumed = BlendedSampler(SIZES, plan, seed=5)
    assert resumed.load_state_dict(saved) is None
    assert drive(resumed, range(8, plan.total_steps)) == drive(first, range(8, plan.total_steps))


def test_observe_wants_the_step_just_drawn_and_its_losses():
    plan = online_plan()
    sampler = BlendedSampler(SIZES, plan, seed=1)
    drive(sampler, range(3))
    assert sampler.observe(2, None) is None  # step 2 was in the fixed phase: nothing to do
    batch = sampler.global_batch(3)
    with pytest.raises(DataError, match="has no per-dataset training loss"):
        sampler.observe(3, None)
    with pytest.raises(DataError, match="observes the step just drawn"):
        sampler.observe(2, row_sums(batch, 3))
    sampler.observe(3, row_sums(batch, 3))
    with pytest.raises(DataError, match="observes the step just drawn"):
        sampler.observe(3, row_sums(batch, 3))


def test_plan_refuses_mixing_that_cannot_work():
    def build(weights, mixing, steps=4):
        return RunPlan.build([PhaseSpec("p", steps * B * SEQ, weights, LR, mixing=mixing)], B, SEQ)

    with pytest.raises(ValueError, match="phase 'p': mixing.every \\(4\\) is not below the phase's 4 steps"):
        build({"a": 0.5, "b": 0.5}, MixingSpec(every=4))
    with pytest.raises(ValueError, match="at least two datasets"):
        build({"a": 1.0}, MixingSpec(every=1))
    with pytest.raises(ValueError, match="mixing.reference must give a finite loss for each of \\['a', 'b'\\]"):
        build({"a": 0.5, "b": 0.5}, MixingSpec(every=1, reference={"a": 1.0}))
    with pytest.raises(ValueError, match="mixing.eta must be a finite number > 0"):
        build({"a": 0.5, "b": 0.5}, MixingSpec(every=1, eta=0.0))
