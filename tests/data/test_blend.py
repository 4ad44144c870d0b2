"""The blended sampler's contract (design.md, "The phase scheduler contract"), as property tests."""
import json
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacrystal.data.blend import BlendedSampler, _Apportioner, epoch_order, shard
from megacrystal.schedule.lr import LRSegment
from megacrystal.schedule.plan import PhaseSpec, RunPlan

SEQ = 8
LR = LRSegment(peak=1e-3, warmup_steps=1, end=1e-4)
NAMES = ["arxiv", "book", "c4", "cc", "code", "wiki"]
FAST = settings(max_examples=40, deadline=None)


def make_plan(phase_weights: list[dict[str, float]], phase_steps: list[int], b: int) -> RunPlan:
    phases = [PhaseSpec(f"phase{i}", n * b * SEQ, w, LR) for i, (w, n) in enumerate(zip(phase_weights, phase_steps))]
    return RunPlan.build(phases, global_batch_size=b, seq_length=SEQ, renormalize=True)


@st.composite
def weight_dicts(draw, names):
    weights = {n: draw(st.one_of(st.just(0.0), st.floats(1e-3, 1.0))) for n in names}
    if sum(weights.values()) == 0:
        weights[names[0]] = 1.0
    return weights


@st.composite
def scenarios(draw):
    """A plan of 1-3 phases over 1-5 small datasets (some weights 0), with its dataset sizes and seed."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    b = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    n_phases = draw(st.integers(1, 3))
    weights = [draw(weight_dicts(names)) for _ in range(n_phases)]
    steps = [draw(st.integers(1, 6)) for _ in range(n_phases)]
    sizes = {n: draw(st.integers(1, 25)) for n in names}
    return make_plan(weights, steps, b), sizes, draw(st.integers(0, 2**32))


def run(sampler: BlendedSampler, steps: range) -> list[list[tuple[str, int]]]:
    return [sampler.global_batch(step) for step in steps]


def assert_within_one_sample(batches, weights: dict[str, float], b: int) -> None:
    """After k batches, every dataset's count is within one sample of w_d * k * B."""
    counts = Counter()
    for k, batch in enumerate(batches, start=1):
        counts.update(name for name, _ in batch)
        for name, w in weights.items():
            assert abs(counts[name] - w * k * b) <= 1 + 1e-9, (name, k, counts[name], w * k * b)
            if w == 0:
                assert counts[name] == 0


def assert_walks_epoch_orders(batches, sizes: dict[str, int], seed: int) -> None:
    """Each dataset's draws are exactly its epoch orders back to back: no repeat, no skip within an epoch."""
    drawn = defaultdict(list)
    for batch in batches:
        for name, index in batch:
            drawn[name].append(index)
    for name, indices in drawn.items():
        size = sizes[name]
        stream = [i for e in range(len(indices) // size + 1) for i in epoch_order(size, seed, name, e)]
        assert indices == stream[: len(indices)], name


@FAST
@given(scenarios())
def test_every_phase_stays_within_one_sample_of_its_weights(scenario):
    plan, sizes, seed = scenario
    sampler = BlendedSampler(sizes, plan, seed)
    for bound, spec in zip(plan.boundaries(), plan.phases):
        batches = run(sampler, range(bound.start_step, bound.end_step))
        assert_within_one_sample(batches, spec.weights, plan.global_batch_size)
        realized = Counter(name for batch in batches for name, _ in batch)
        assert sampler.phase_counts() == {n: realized[n] for n in spec.weights}
        assert sampler.realized_blend()[spec.name] == sampler.phase_counts()


@FAST
@given(scenarios())
def test_cursors_run_through_epochs_across_phases(scenario):
    plan, sizes, seed = scenario
    sampler = BlendedSampler(sizes, plan, seed)
    batches = run(sampler, range(plan.total_steps))
    assert_walks_epoch_orders(batches, sizes, seed)
    consumed = Counter(name for batch in batches for name, _ in batch)
    assert sampler.consumed_samples() == {n: consumed[n] for n in sizes}
    assert sampler.consumed_tokens() == {n: consumed[n] * SEQ for n in sizes}
    # One event per completed epoch, at the step whose batch finished it.
    for name, size in sizes.items():
        events = [e for e in sampler.epoch_events if e.dataset == name]
        assert [e.epoch for e in events] == list(range(1, consumed[name] // size + 1))
        running = 0
        for step, batch in enumerate(batches):
            before, running = running, running + sum(1 for n, _ in batch if n == name)
            expected = list(range(before // size + 1, running // size + 1))
            assert [e.epoch for e in events if e.step == step] == expected


@FAST
@given(scenarios(), st.data())
def test_batches_do_not_depend_on_data_parallel_size(scenario, data):
    plan, sizes, seed = scenario
    b = plan.global_batch_size
    batches = run(BlendedSampler(sizes, plan, seed), range(plan.total_steps))
    assert batches == run(BlendedSampler(dict(reversed(sizes.items())), plan, seed), range(plan.total_steps))
    for dp in (d for d in (1, 2, 3, 4, 8) if b % d == 0):
        for batch in batches:
            shards = [shard(batch, rank, dp) for rank in range(dp)]
            assert all(len(s) == b // dp for s in shards)
            assert [x for s in shards for x in s] == batch
    bad = data.draw(st.integers(2, 2 * b + 2).filter(lambda d: b % d))
    with pytest.raises(ValueError, match="does not divide"):
        shard(batches[0], 0, bad)


@FAST
@given(scenarios(), st.data())
def test_resume_reproduces_the_uninterrupted_run(scenario, data):
    plan, sizes, seed = scenario
    total = plan.total_steps
    k = data.draw(st.integers(0, total), label="resume step")
    reference = BlendedSampler(sizes, plan, seed)
    expected = run(reference, range(total))
    first = BlendedSampler(sizes, plan, seed)
    head = run(first, range(k))
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint round trip sees
    resumed = BlendedSampler(sizes, plan, seed)
    assert resumed.load_state_dict(saved) is None
    assert resumed.next_step == k
    assert head + run(resumed, range(k, total)) == expected
    assert resumed.state_dict() == reference.state_dict()


@FAST
@given(scenarios(), st.data())
def test_resume_with_new_weights_continues_every_cursor(scenario, data):
    plan, sizes, seed = scenario
    total = plan.total_steps
    k = data.draw(st.integers(0, total - 1), label="resume step")
    index, spec, _ = plan.phase_at_step(k)
    names = list(sizes)
    new_weights = [data.draw(weight_dicts(names)) if i >= index else p.weights for i, p in enumerate(plan.phases)]
    new_plan = make_plan(new_weights, list(plan.steps), plan.global_batch_size)

    first = BlendedSampler(sizes, plan, seed)
    head = run(first, range(k))
    resumed = BlendedSampler(sizes, new_plan, seed)
    change = resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = run(resumed, range(k, total))

    assert_walks_epoch_orders(head + tail, sizes, seed)
    new_spec = new_plan.phases[index]
    started_phase = k == plan.boundaries()[index].start_step
    weights_moved = any(abs(new_spec.weights.get(n, 0) - spec.weights.get(n, 0)) > 1e-12 for n in names)
    if started_phase or not weights_moved:
        assert change is None
    else:
        assert change is not None and change in resumed.blend_changes
        assert change.step == k and change.new_weights == new_spec.weights
        assert f"phase {spec.name!r}" in change.describe() and "restarts" in change.describe()
    # Blend accounting restarts at the resume point, under the new weights.
    end = new_plan.boundaries()[index].end_step
    assert_within_one_sample(tail[: end - k], new_spec.weights, plan.global_batch_size)
    # The phase's realized blend spans the checkpoint: samples drawn before and after the resume.
    phase_samples = (end - new_plan.boundaries()[index].start_step) * plan.global_batch_size
    assert sum(resumed.realized_blend()[new_spec.name].values()) == phase_samples


def test_resume_where_the_new_plan_moves_a_phase_boundary_is_reported():
    old = make_plan([{"a": 1.0}, {"b": 1.0}], [4, 4], 2)
    new = make_plan([{"a": 1.0}, {"b": 1.0}], [2, 6], 2)
    sampler = BlendedSampler({"a": 5, "b": 5}, old, seed=3)
    run(sampler, range(3))
    resumed = BlendedSampler({"a": 5, "b": 5}, new, seed=3)
    change = resumed.load_state_dict(sampler.state_dict())
    assert change.previous_phase == "phase0" and change.phase == "phase1"
    assert "phase boundaries moved" in change.describe()
    assert all(name == "b" for batch in run(resumed, range(3, 8)) for name, _ in batch)


def test_checkpoint_at_a_phase_boundary_is_not_a_change():
    plan = make_plan([{"a": 1.0}, {"a": 0.5, "b": 0.5}], [3, 3], 4)
    sampler = BlendedSampler({"a": 7, "b": 7}, plan, seed=0)
    run(sampler, range(3))
    resumed = BlendedSampler({"a": 7, "b": 7}, plan, seed=0)
    assert resumed.load_state_dict(sampler.state_dict()) is None
    assert run(resumed, range(3, 6)) == run(sampler, range(3, 6))


def test_datasets_dropped_on_resume_keep_their_cursor_and_new_ones_start_fresh():
    plan = make_plan([{"a": 0.5, "b": 0.5}], [4], 4)
    sampler = BlendedSampler({"a": 9, "b": 9}, plan, seed=1)
    run(sampler, range(2))
    saved = sampler.state_dict()
    new_plan = make_plan([{"a": 0.5, "c": 0.5}], [4], 4)
    resumed = BlendedSampler({"a": 9, "c": 5}, new_plan, seed=1)
    resumed.load_state_dict(saved)
    run(resumed, range(2, 4))
    state = resumed.state_dict()["datasets"]
    assert state["b"] == saved["datasets"]["b"]
    assert state["c"]["consumed"] == 4 and state["a"]["consumed"] == 8


def test_crystal_phase1_blend_at_full_batch_size():
    weights = {"arxiv": 0.043251179622600486, "book": 0.0413121881861869, "c4": 0.2665010054745754,
               "cc": 0.5334581653397988, "github": 0.04962588209760537, "stackexchange": 0.03168034115317788,
               "wikipedia": 0.03417123812605512}
    plan = make_plan([weights], [3], 2112)
    sizes = {n: 10**8 for n in weights}
    batches = run(BlendedSampler(sizes, plan, seed=1), range(3))
    assert_within_one_sample(batches, plan.phases[0].weights, 2112)
    assert len({x for batch in batches for x in batch}) == 3 * 2112


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=12), st.integers(1, 3000))
def test_apportioner_bound_over_long_horizons(raw, slots):
    weights = {f"d{i}": w / sum(raw) for i, w in enumerate(raw)}
    apportioner = _Apportioner(weights)
    counts = [0] * len(weights)
    bound = 1 - 1 / (2 * len(weights) - 2) if len(weights) > 1 else 0
    ws = [weights[n] for n in apportioner.names]
    for t, d in enumerate(apportioner.take(slots), start=1):
        counts[d] += 1
        assert max(abs(c - w * t) for c, w in zip(counts, ws)) <= bound + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 600), st.integers(0, 2**40), st.sampled_from(NAMES), st.integers(0, 50))
def test_epoch_order_is_a_permutation(size, seed, name, epoch):
    order = epoch_order(size, seed, name, epoch)
    assert sorted(order) == list(range(size))


def test_epoch_orders_differ_by_seed_name_and_epoch():
    base = epoch_order(1000, 1, "cc", 0)
    assert base != list(range(1000))
    for other in (epoch_order(1000, 2, "cc", 0), epoch_order(1000, 1, "c4", 0), epoch_order(1000, 1, "cc", 1)):
        assert other != base
    assert epoch_order(1000, 1, "cc", 0) == base


def test_missing_or_empty_dataset_is_named():
    plan = make_plan([{"a": 0.5, "b": 0.5}], [2], 2)
    with pytest.raises(ValueError, match="dataset 'b' is weighted in phase 'phase0' but has no size"):
        BlendedSampler({"a": 3}, plan, 0)
    with pytest.raises(ValueError, match="dataset 'b' has 0 samples"):
        BlendedSampler({"a": 3, "b": 0}, plan, 0)
    with pytest.raises(ValueError, match="dataset 'a'.*non-negative integer"):
        BlendedSampler({"a": -1, "b": 3}, plan, 0)
    # Weight 0 with no samples is fine: it is never drawn.
    BlendedSampler({"a": 3, "b": 0}, make_plan([{"a": 1.0, "b": 0.0}], [2], 2), 0)


def test_steps_must_be_consecutive():
    sampler = BlendedSampler({"a": 3}, make_plan([{"a": 1.0}], [5], 2), 0)
    sampler.global_batch(0)
    with pytest.raises(ValueError, match="expected global step 1, got 2"):
        sampler.global_batch(2)
    with pytest.raises(ValueError, match="expected global step 1, got 0"):
        sampler.global_batch(0)


def test_state_that_does_not_fit_is_refused():
    plan = make_plan([{"a": 1.0}], [5], 2)
    sampler = BlendedSampler({"a": 3}, plan, 0)
    run(sampler, range(2))
    saved = sampler.state_dict()
    with pytest.raises(ValueError, match="seed"):
        BlendedSampler({"a": 3}, plan, 1).load_state_dict(saved)
    fresh = BlendedSampler({"a": 4}, plan, 0)
    with pytest.raises(ValueError, match="dataset 'a' had 3 samples in the checkpoint but has 4"):
        fresh.load_state_dict(saved)
    assert fresh.state_dict() == BlendedSampler({"a": 4}, plan, 0).state_dict()  # refused means untouched
