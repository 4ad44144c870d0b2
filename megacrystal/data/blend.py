"""Phase-aware blended sampler: which (dataset, sample) fills each slot of each global batch.

Three pieces, each deterministic given the seed and independent of the data-parallel size:
- `_Apportioner` decides which dataset fills each slot, so the per-phase count of every dataset stays within
  one sample of its target w_d * slots.
- `_EpochOrder` (data/epoch_order.py) is a keyed permutation of one dataset's samples for one epoch.
- A cursor per dataset (epoch, position) walks that dataset's epoch orders for the whole run, across phases.
A phase with online mixing (data/mixing.py) changes its weights every few steps; each change starts a new
accounting segment (a fresh `_Apportioner` from that step), so every segment keeps the one-sample bound and the
cursors, and with them the per-dataset counts, run on unchanged.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from megacrystal.data.errors import DataError
from megacrystal.schedule.plan import MixingSpec, PhaseSpec, RunPlan

from .epoch_order import _EpochOrder, epoch_order
from .mixing import OnlineMixer

__all__ = ["BlendChange", "BlendedSampler", "EpochEvent", "epoch_order", "shard"]

STATE_FORMAT = "megacrystal.blend/1"
_WEIGHT_MATCH = 1e-12


@dataclass(frozen=True)
class EpochEvent:
    """Dataset `dataset` ran out of samples during global step `step` and started epoch `epoch`."""

    dataset: str
    epoch: int
    step: int


@dataclass(frozen=True)
class BlendChange:
    """On resume, the blend of the resumed step differs from the checkpoint's (weights, phase or batch size)."""

    step: int
    phase: str
    previous_phase: str
    old_weights: dict[str, float]
    new_weights: dict[str, float]
    old_global_batch_size: int
    new_global_batch_size: int
    old_mixing: str = "static"
    new_mixing: str = "static"

    def describe(self) -> str:
        """One log line saying what changed."""
        names = sorted(set(self.old_weights) | set(self.new_weights))
        diffs = [
            f"{n} {self.old_weights.get(n, 0.0):.6g} -> {self.new_weights.get(n, 0.0):.6g}"
            for n in names
            if abs(self.old_weights.get(n, 0.0) - self.new_weights.get(n, 0.0)) > _WEIGHT_MATCH
        ]
        what = f"phase {self.phase!r}" if self.phase == self.previous_phase else (
            f"phase {self.previous_phase!r} -> {self.phase!r} (phase boundaries moved)")
        parts = [f"step {self.step}: blend changed on resume in {what}"]
        if diffs:
            parts.append("weights " + ", ".join(diffs))
        if self.old_global_batch_size != self.new_global_batch_size:
            parts.append(f"global batch {self.old_global_batch_size} -> {self.new_global_batch_size}")
        if self.old_mixing != self.new_mixing:
            parts.append(f"mixing {self.old_mixing} -> {self.new_mixing}")
        parts.append("dataset cursors continue; blend accounting restarts at this step")
        return "; ".join(parts)


def _positive_weights(weights: dict[str, float]) -> dict[str, float]:
    return {name: w for name, w in sorted(weights.items()) if w > 0}


def _same_weights(a: dict[str, float], b: dict[str, float]) -> bool:
    a, b = _positive_weights(a), _positive_weights(b)
    return a.keys() == b.keys() and all(abs(a[n] - b[n]) <= _WEIGHT_MATCH for n in a)


def _same_blend(saved: dict, spec: PhaseSpec) -> bool:
    """Whether a saved phase state continues under `spec`: same weights, or the same online mixing."""
    mixer = saved.get("mixer")
    if spec.mixing is None:
        return mixer is None and _same_weights(saved["weights"], spec.weights)
    # Through MixingSpec, so a state saved before an option existed compares with that option's default.
    return mixer is not None and MixingSpec(**mixer["spec"]).to_json() == spec.mixing.to_json() and \
        _same_weights(mixer["initial"], spec.weights)


def _mixing_of(saved: dict) -> str:
    mixer = saved.get("mixer")
    return OnlineMixer.from_state(mixer).spec.describe() if mixer else "static"


class _Apportioner:
    """Assigns slots to datasets with Tijdeman's rule, keeping |drawn_d - w_d * slots| <= 1 - 1/(2n - 2).

    Plain "largest deficit first" can overshoot one sample (about 1.08 in random trials). Tijdeman's rule
    (the chairman assignment problem, 1980) only lets a dataset go once its deficit reaches sigma = 1/(2n-2),
    and among those picks the earliest deadline, i.e. the one that would first fall a full 1 - sigma behind.
    Both keys change only when that dataset is drawn, so two heaps make each slot O(log n).
    The state is just (drawn counts, slots): the heaps are rebuilt from it on resume.
    """

    def __init__(self, weights: dict[str, float], drawn: dict[str, int] | None = None, slots: int = 0) -> None:
        positive = _positive_weights(weights)
        self.names = list(positive)  # sorted: the fixed tie-break order
        self._w = [positive[n] for n in self.names]
        n = len(self.names)
        self._sigma = 1.0 / (2 * n - 2) if n > 1 else 0.0
        self.drawn = [int((drawn or {}).get(name, 0)) for name in self.names]
        self.slots = slots
        self._waiting = [(self._release(d), d) for d in range(n)]
        heapq.heapify(self._waiting)
        self._ready: list[tuple[float, int]] = []

    def _release(self, d: int) -> float:
        return (self.drawn[d] + self._sigma) / self._w[d]

    def take(self, count: int) -> list[int]:
        """Dataset positions (into `names`) of the next `count` slots."""
        waiting, ready, drawn, w = self._waiting, self._ready, self.drawn, self._w
        late = 1.0 - self._sigma
        out = [0] * count
        t = self.slots
        for j in range(count):
            t += 1
            while waiting and waiting[0][0] <= t:
                d = heapq.heappop(waiting)[1]
                heapq.heappush(ready, ((drawn[d] + late) / w[d], d))
            # The theorem guarantees a ready dataset; the fallback only guards float rounding at the edge.
            d = heapq.heappop(ready)[1] if ready else heapq.heappop(waiting)[1]
            drawn[d] += 1
            heapq.heappush(waiting, (self._release(d), d))
            out[j] = d
        self.slots = t
        return out

    def drawn_dict(self) -> dict[str, int]:
        """Samples drawn per dataset since this apportioner started."""
        return dict(zip(self.names, self.drawn))


@dataclass
class _Cursor:
    size: int
    epoch: int = 0
    position: int = 0
    consumed: int = 0


@dataclass
class _PhaseState:
    index: int
    name: str
    end_step: int
    weights: dict[str, float]
    global_batch_size: int
    segment_start_step: int
    apportioner: _Apportioner = field(repr=False)
    mixer: OnlineMixer | None = field(default=None, repr=False)  # online mixing, else the weights are fixed


def shard(global_batch: list, dp_rank: int, dp_size: int) -> list:
    """The contiguous slice of a global batch that data-parallel rank `dp_rank` of `dp_size` trains on."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank must be in [0, dp_size) with dp_size >= 1, got rank {dp_rank} of {dp_size}")
    if len(global_batch) % dp_size:
        raise DataError(f"data-parallel size {dp_size} does not divide the global batch size {len(global_batch)}")
    per_rank = len(global_batch) // dp_size
    return global_batch[dp_rank * per_rank: (dp_rank + 1) * per_rank]


class BlendedSampler:
    """Yields global batches of (dataset, sample index) pairs following a RunPlan, one cursor per dataset.

    Errors are `DataError` (a ValueError) naming the dataset, the step or the checkpoint field at fault.
    """

    def __init__(self, dataset_sizes: dict[str, int], plan: RunPlan, seed: int) -> None:
        for name, size in dataset_sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise DataError(f"dataset {name!r}: size must be a non-negative integer, got {size!r}")
        for phase in plan.phases:
            for name, weight in phase.weights.items():
                if name not in dataset_sizes:
                    raise DataError(f"dataset {name!r} is weighted in phase {phase.name!r} but has no size")
                if weight > 0 and dataset_sizes[name] == 0:
                    raise DataError(f"dataset {name!r} has 0 samples but weight {weight} in phase {phase.name!r}")
        self.plan = plan
        self.seed = int(seed)
        self._cursors = {name: _Cursor(size) for name, size in sorted(dataset_sizes.items())}
        # Cursors of datasets that are in a checkpoint but not in this run; carried so they are not lost.
        self._dormant: dict[str, dict] = {}
        self._orders: dict[str, _EpochOrder] = {}
        self._phase: _PhaseState | None = None
        self._realized: dict[str, dict[str, int]] = {}
        self._segments: list[dict] = []  # closed online-mixing segments: phase, steps, weights, drawn
        self._next_step = 0
        self._observed_step = -1
        self.epoch_events: list[EpochEvent] = []
        self.blend_changes: list[BlendChange] = []

    @property
    def next_step(self) -> int:
        """The global step the next `global_batch` call must ask for."""
        return self._next_step

    def global_batch(self, step: int) -> list[tuple[str, int]]:
        """The B (dataset, sample index) pairs of global step `step`; steps must be consecutive."""
        if step != self._next_step:
            raise DataError(f"sampler expected global step {self._next_step}, got {step} (steps must be consecutive)")
        index, spec, _ = self.plan.phase_at_step(step)
        # Compare names, not indices: after a resume the current phase may come from the checkpoint's plan.
        if self._phase is None or self._phase.name != spec.name:
            self._begin_phase(index, step)
        phase = self._phase
        slots = phase.apportioner.take(self.plan.global_batch_size)
        names = phase.apportioner.names
        counts = [0] * len(names)
        for d in slots:
            counts[d] += 1
        drawn = [iter(self._draw(names[d], n, step)) if n else iter(()) for d, n in enumerate(counts)]
        realized = self._realized[phase.name]
        for d, n in enumerate(counts):
            realized[names[d]] += n
        self._next_step = step + 1
        return [(names[d], next(drawn[d])) for d in slots]

    def _begin_phase(self, index: int, step: int) -> None:
        spec = self.plan.phases[index]
        if self._phase is not None and self._phase.mixer is not None:  # the last segment of an online phase
            self._segments.append(self._segment(self._phase, step))
        self._phase = _PhaseState(
            index=index,
            name=spec.name,
            end_step=self.plan.boundaries()[index].end_step,
            weights=dict(spec.weights),
            global_batch_size=self.plan.global_batch_size,
            segment_start_step=step,
            apportioner=_Apportioner(spec.weights),
            mixer=OnlineMixer(spec.mixing, spec.weights) if spec.mixing else None,
        )
        realized = self._realized.setdefault(spec.name, {})
        for name in spec.weights:
            realized.setdefault(name, 0)

    @property
    def mixing_weights(self) -> dict[str, float] | None:
        """The weights of the current segment when the current phase mixes online, else None."""
        return dict(self._phase.weights) if self._phase is not None and self._phase.mixer is not None else None

    def observe(self, step: int, sums: dict[str, tuple[float, float]] | None) -> dict[str, float] | None:
        """Give the online mixing of the current phase step `step`'s (loss sum, tokens) per dataset; when that
        completes an update window (and the phase goes on), return the new weights: batches from step + 1 on
        are drawn with them, in a new accounting segment. A phase with fixed weights ignores the call."""
        phase = self._phase
        if phase is None or phase.mixer is None:
            return None
        if step != self._next_step - 1 or step == self._observed_step:
            raise DataError(f"online mixing observes the step just drawn ({self._next_step - 1}) once, got {step}")
        if sums is None:
            raise DataError(f"phase {phase.name!r} mixes online but step {step + 1} has no per-dataset training "
                            "loss (the engine reports no row losses)")
        self._observed_step = step
        if not phase.mixer.observe(sums) or step + 1 >= phase.end_step:
            return None
        weights = phase.mixer.update()
        if weights != phase.weights:
            self._segments.append(self._segment(phase, end_step=step + 1))
            phase.weights, phase.segment_start_step = dict(weights), step + 1
            phase.apportioner = _Apportioner(weights)
        return weights

    @staticmethod
    def _segment(phase: _PhaseState, end_step: int) -> dict:
        return {"phase": phase.name, "start_step": phase.segment_start_step, "end_step": end_step,
                "weights": dict(phase.weights), "drawn": phase.apportioner.drawn_dict()}

    def segments(self) -> list[dict]:
        """Every online-mixing segment so far (the open one last, to the next step): phase, [start_step,
        end_step), weights and samples drawn per dataset; each stays within one sample of weights x slots."""
        phase = self._phase
        open_segment = [self._segment(phase, self._next_step)] if phase is not None and phase.mixer else []
        return [dict(s) for s in self._segments] + open_segment

    def _order(self, name: str, cursor: _Cursor) -> _EpochOrder:
        order = self._orders.get(name)
        if order is None or order.epoch != cursor.epoch:
            order = _EpochOrder(cursor.size, self.seed, name, cursor.epoch)
            self._orders[name] = order
        return order

    def _draw(self, name: str, count: int, step: int) -> list[int]:
        """Take the next `count` samples of dataset `name`, starting new epochs as needed."""
        cursor = self._cursors[name]
        pieces = []
        while count:
            take = min(count, cursor.size - cursor.position)
            positions = np.arange(cursor.position, cursor.position + take, dtype=np.uint64)
            pieces.extend(self._order(name, cursor)(positions).tolist())
            cursor.position += take
            cursor.consumed += take
            count -= take
            if cursor.position == cursor.size:
                cursor.epoch += 1
                cursor.position = 0
                self.epoch_events.append(EpochEvent(name, cursor.epoch, step))
        return pieces

    def consumed_samples(self) -> dict[str, int]:
        """Samples drawn per dataset over the whole run."""
        return {name: c.consumed for name, c in self._cursors.items()}

    def consumed_tokens(self) -> dict[str, int]:
        """Tokens drawn per dataset over the whole run (samples x seq_length)."""
        return {name: n * self.plan.seq_length for name, n in self.consumed_samples().items()}

    def phase_counts(self) -> dict[str, int]:
        """Samples drawn per dataset in the current phase (the phase of the last batch)."""
        return dict(self._realized[self._phase.name]) if self._phase else {}

    def realized_blend(self) -> dict[str, dict[str, int]]:
        """Samples drawn per dataset for every phase seen so far, to plot against the planned weights."""
        return {phase: dict(counts) for phase, counts in self._realized.items()}

    def state_dict(self) -> dict:
        """JSON-serializable state: cursors, phase accounting, step and consumption."""
        datasets = {
            name: {"size": c.size, "epoch": c.epoch, "position": c.position, "consumed": c.consumed}
            for name, c in self._cursors.items()
        }
        phase = None
        if self._phase is not None:
            p = self._phase
            phase = {
                "index": p.index,
                "name": p.name,
                "end_step": p.end_step,
                "weights": dict(p.weights),
                "global_batch_size": p.global_batch_size,
                "segment_start_step": p.segment_start_step,
                "segment_slots": p.apportioner.slots,
                "segment_drawn": p.apportioner.drawn_dict(),
            }
            if p.mixer is not None:  # a phase with fixed weights keeps the state it always had
                phase["mixer"] = p.mixer.state_dict()
        state = {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "step": self._next_step,
            "phase": phase,
            "datasets": {**self._dormant, **datasets},
            "realized": self.realized_blend(),
        }
        if self._segments:
            state["segments"] = [dict(s) for s in self._segments]
        return state

    def load_state_dict(self, sd: dict, allow_size_change: set[str] = frozenset()) -> BlendChange | None:
        """Restore a state; if this plan's blend at the resumed step differs, return (and record) the change.

        Datasets in `allow_size_change` (re-prepared with the user's consent) may have another size: their
        cursor keeps its epoch and position, clipped to the new size (at the end it starts the next epoch);
        the epoch's order is that of the new size, so it is a new walk from that position, not the old one.
        """
        if sd.get("format") != STATE_FORMAT:
            raise DataError(f"sampler state format {sd.get('format')!r} is not {STATE_FORMAT!r}")
        missing = [key for key in ("seed", "step", "phase", "datasets", "realized") if key not in sd]
        if missing:
            raise DataError(f"sampler state is missing {missing}")
        if int(sd["seed"]) != self.seed:
            # A different seed would reorder the current epochs mid-way: samples would repeat and be skipped.
            raise DataError(f"seed {self.seed} differs from the checkpoint's sampler seed {sd['seed']}")
        # Check every dataset before touching any cursor, so a refused state leaves the sampler as it was.
        for name, saved in sd["datasets"].items():
            cursor = self._cursors.get(name)
            if cursor is not None and saved["size"] != cursor.size and name not in allow_size_change:
                raise DataError(
                    f"dataset {name!r} had {saved['size']} samples in the checkpoint but has {cursor.size} now; "
                    "its cursor would point into a different order"
                )
        dormant = {name: dict(saved) for name, saved in sd["datasets"].items() if name not in self._cursors}
        for name, cursor in self._cursors.items():
            # A dataset new to this run starts at its first epoch.
            saved = sd["datasets"].get(name, {"epoch": 0, "position": 0, "consumed": 0})
            cursor.epoch, cursor.position, cursor.consumed = saved["epoch"], saved["position"], saved["consumed"]
            if cursor.position >= cursor.size > 0:  # a dataset that shrank past its cursor: next epoch
                cursor.epoch, cursor.position = cursor.epoch + 1, 0
        self._dormant = dormant
        self._orders.clear()
        self._realized = {phase: dict(counts) for phase, counts in sd["realized"].items()}
        self._segments = [dict(s) for s in sd.get("segments", [])]
        self._next_step = int(sd["step"])
        self._observed_step = self._next_step - 1  # the checkpoint was saved after its step was observed
        self._phase = None
        change = self._restore_phase(sd["phase"])
        if change is not None and sd["phase"].get("mixer"):  # the saved phase's open segment ends here
            self._segments.append(self._segment(self._saved_phase(sd["phase"]), self._next_step))
        return change

    def _restore_phase(self, saved: dict | None) -> BlendChange | None:
        step = self._next_step
        if saved is None:
            return None
        spec = self.plan.phase_at_step(step)[1] if step < self.plan.total_steps else None
        if spec is not None and spec.name == saved["name"]:
            same_batch = saved["global_batch_size"] == self.plan.global_batch_size
            if same_batch and _same_blend(saved, spec):
                self._phase = self._saved_phase(saved)
                return None
            self._begin_phase(self.plan.phase_index(spec.name), step)
            return self._record_change(saved, spec.name)
        if spec is None or step == saved["end_step"]:
            # The last batch finished the saved phase: keep it current so phase_counts() and state_dict()
            # survive the round trip; the next batch, if any, starts its own phase as usual.
            self._phase = self._saved_phase(saved)
            return None
        # The new plan puts this step in another phase mid-way: start that phase here and say so.
        self._begin_phase(self.plan.phase_index(spec.name), step)
        return self._record_change(saved, spec.name)

    @staticmethod
    def _saved_phase(saved: dict) -> _PhaseState:
        return _PhaseState(
            index=saved["index"],
            name=saved["name"],
            end_step=saved["end_step"],
            weights=dict(saved["weights"]),
            global_batch_size=saved["global_batch_size"],
            segment_start_step=saved["segment_start_step"],
            apportioner=_Apportioner(saved["weights"], saved["segment_drawn"], saved["segment_slots"]),
            mixer=OnlineMixer.from_state(saved["mixer"]) if saved.get("mixer") else None,
        )

    def _record_change(self, saved: dict, phase: str) -> BlendChange:
        change = BlendChange(
            step=self._next_step,
            phase=phase,
            previous_phase=saved["name"],
            old_weights=dict(saved["weights"]),
            new_weights=dict(self._phase.weights),
            old_global_batch_size=saved["global_batch_size"],
            new_global_batch_size=self.plan.global_batch_size,
            old_mixing=_mixing_of(saved),
            new_mixing=self._phase.mixer.spec.describe() if self._phase.mixer else "static",
        )
        self.blend_changes.append(change)
        return change

