"""RunPlan: the training phases laid out on the global step axis, with blend weights and LR per phase."""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Mapping, Union

from megacrystal.schedule.lr import LRSegment, lr_at

WEIGHT_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MixingSpec:
    """Online mixing of one phase's blend (data/mixing.py applies it): every `every` steps the weights move
    toward the datasets with the largest excess training loss (rule `eg`: DoReMi's exponentiated gradient;
    `exp3`: ODM's softmax of a smoothed reward), mixed with `epsilon` of the uniform blend (with `exploration`
    "decay", ODM's share shrinking with the phase's steps, at least `epsilon`) and rounded to multiples of
    1/`grid`. `reference` is what the loss is in excess of: the loss of the phase's first
    update window ("first"), nothing ("none": the loss itself) or a loss per dataset (DoReMi's reference
    model; the excess is then clipped at 0). `smoothing` is the moving-average factor over update windows.
    """

    rule: Literal["eg", "exp3"] = "eg"
    eta: float = 1.0
    every: int = 10
    epsilon: float = 0.05
    exploration: Literal["fixed", "decay"] = "fixed"
    smoothing: float = 0.0
    reference: Union[Literal["first", "none"], Mapping[str, float]] = "first"
    grid: int = 1024

    def validate(self, datasets: list[str]) -> None:
        """Raise ValueError naming the first invalid field, for a phase blending `datasets`."""
        if self.rule not in ("eg", "exp3"):
            raise ValueError(f"mixing.rule must be eg or exp3, got {self.rule!r}")
        if self.exploration not in ("fixed", "decay"):
            raise ValueError(f"mixing.exploration must be fixed or decay, got {self.exploration!r}")
        for name, value, ok, what in (("eta", self.eta, lambda v: v > 0, "> 0"),
                                      ("epsilon", self.epsilon, lambda v: 0 <= v <= 1, "in [0, 1]"),
                                      ("smoothing", self.smoothing, lambda v: 0 <= v < 1, "in [0, 1)")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"mixing.{name} must be a finite number {what}, got {value!r}")
        for name, value, low in (("every", self.every, 1), ("grid", self.grid, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"mixing.{name} must be an integer >= {low}, got {value!r}")
        if len(datasets) < 2:
            raise ValueError(f"mixing needs at least two datasets in the phase's weights, got {datasets}")
        if isinstance(self.reference, str):
            if self.reference not in ("first", "none"):
                raise ValueError(f"mixing.reference must be first, none or a loss per dataset, got {self.reference!r}")
        elif sorted(self.reference) != sorted(datasets) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in self.reference.values()):
            raise ValueError(f"mixing.reference must give a finite loss for each of {sorted(datasets)}, "
                             f"got {dict(self.reference)}")

    def to_json(self) -> dict:
        """The options as plain JSON values (kept in a checkpoint to tell whether a resume changed them)."""
        out = dataclasses.asdict(self)
        out["reference"] = self.reference if isinstance(self.reference, str) else dict(sorted(self.reference.items()))
        return out

    def describe(self) -> str:
        """One line for logs, e.g. 'online eg (eta 1, every 10 steps, epsilon 0.05, reference first)'."""
        reference = self.reference if isinstance(self.reference, str) else "per dataset"
        epsilon = f"epsilon {self.epsilon:g}" + (", decaying as ODM's" if self.exploration == "decay" else "")
        return f"online {self.rule} (eta {self.eta:g}, every {self.every} steps, {epsilon}, reference {reference})"


@dataclass(frozen=True)
class PhaseSpec:
    """One training phase as configured: token budget, blend weights, LR segment, FIM rate."""

    name: str
    tokens: int
    weights: dict[str, float]
    lr: LRSegment
    fim_rate: float = 0.0
    # Crystal phase 3: load weights only, fresh optimizer state and step count.
    weights_only_start: bool = False
    mixing: MixingSpec | None = None  # None: the weights hold for the whole phase


@dataclass(frozen=True)
class PhaseRounding:
    """How a phase's token budget was rounded to whole global batches."""

    name: str
    requested_tokens: int
    realized_tokens: int
    steps: int

    @property
    def delta_tokens(self) -> int:
        """Realized minus requested tokens (negative when the phase was rounded down)."""
        return self.realized_tokens - self.requested_tokens


@dataclass(frozen=True)
class PhaseBoundary:
    """Where a phase sits: global steps [start_step, end_step) and tokens [start_token, end_token)."""

    index: int
    name: str
    start_step: int
    end_step: int
    start_token: int
    end_token: int


def _round_steps(tokens: int, tokens_per_step: int) -> int:
    # Round half up in integer arithmetic (floats lose exactness above 2**53 tokens), at least one step.
    return max(1, (2 * tokens + tokens_per_step) // (2 * tokens_per_step))


def _checked_weights(phase: PhaseSpec, renormalize: bool) -> dict[str, float]:
    """Validate a phase's weights and return them normalized to sum exactly to 1."""
    where = f"phase {phase.name!r}"
    if not phase.weights:
        raise ValueError(f"{where}: weights are empty; give at least one dataset a weight > 0")
    for dataset, weight in phase.weights.items():
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"{where}: dataset names must be non-empty strings, got {dataset!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{where}: weight of dataset {dataset!r} must be a finite number, got {weight!r}")
        if weight < 0:
            raise ValueError(f"{where}: weight of dataset {dataset!r} is negative ({weight})")
    total = math.fsum(phase.weights.values())
    if total <= 0:
        raise ValueError(f"{where}: all weights are 0 (datasets {sorted(phase.weights)})")
    if not renormalize and abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(
            f"{where}: weights of datasets {sorted(phase.weights)} sum to {total!r}, expected 1 ± "
            f"{WEIGHT_SUM_TOLERANCE} (pass renormalize=True to normalize them)"
        )
    # Normalize even within tolerance: a 1e-6 excess over 10^8 samples would break the one-sample bound.
    return {dataset: float(weight) / total for dataset, weight in phase.weights.items()}


def _checked_phase(phase: PhaseSpec, renormalize: bool) -> PhaseSpec:
    """Validate one phase and return it with normalized weights."""
    if not isinstance(phase.name, str) or not phase.name:
        raise ValueError(f"phase names must be non-empty strings, got {phase.name!r}")
    where = f"phase {phase.name!r}"
    if isinstance(phase.tokens, bool) or not isinstance(phase.tokens, int) or phase.tokens <= 0:
        raise ValueError(f"{where}: tokens must be a positive integer, got {phase.tokens!r}")
    fim = phase.fim_rate
    if isinstance(fim, bool) or not isinstance(fim, (int, float)) or not 0.0 <= fim <= 1.0:
        raise ValueError(f"{where}: fim_rate must be in [0, 1], got {phase.fim_rate}")
    if not isinstance(phase.lr, LRSegment):
        raise ValueError(f"{where}: lr must be an LRSegment, got {type(phase.lr).__name__}")
    try:
        phase.lr.validate()
        if phase.mixing is not None:
            phase.mixing.validate(sorted(phase.weights))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return dataclasses.replace(phase, weights=_checked_weights(phase, renormalize))


@dataclass(frozen=True)
class RunPlan:
    """Phases on the global step axis; build it with `RunPlan.build`."""

    phases: tuple[PhaseSpec, ...]
    global_batch_size: int
    seq_length: int
    steps: tuple[int, ...]
    rounding: tuple[PhaseRounding, ...]

    @classmethod
    def build(
        cls,
        phases: list[PhaseSpec] | tuple[PhaseSpec, ...],
        global_batch_size: int,
        seq_length: int,
        renormalize: bool = False,
    ) -> RunPlan:
        """Validate phases and round each token budget to whole global batches (half up, at least one)."""
        for field, value in (("global_batch_size", global_batch_size), ("seq_length", seq_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if not phases:
            raise ValueError("a run plan needs at least one phase")
        seen: set[str] = set()
        for phase in phases:
            if phase.name in seen:
                raise ValueError(f"phase {phase.name!r} appears twice; phase names must be unique")
            seen.add(phase.name)
        checked = tuple(_checked_phase(phase, renormalize) for phase in phases)
        tokens_per_step = global_batch_size * seq_length
        steps = tuple(_round_steps(phase.tokens, tokens_per_step) for phase in checked)
        for phase, n in zip(checked, steps):
            if phase.mixing is not None and phase.mixing.every >= n:
                raise ValueError(f"phase {phase.name!r}: mixing.every ({phase.mixing.every}) is not below the "
                                 f"phase's {n} steps, so its weights would never change; lower it")
        rounding = tuple(
            PhaseRounding(phase.name, phase.tokens, n * tokens_per_step, n) for phase, n in zip(checked, steps)
        )
        return cls(checked, global_batch_size, seq_length, steps, rounding)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch (B x S)."""
        return self.global_batch_size * self.seq_length

    @property
    def total_steps(self) -> int:
        """Global steps over all phases."""
        return sum(self.steps)

    @property
    def total_tokens(self) -> int:
        """Realized tokens over all phases."""
        return self.total_steps * self.tokens_per_step

    @property
    def datasets(self) -> list[str]:
        """Every dataset named in any phase's weights, sorted."""
        return sorted({name for phase in self.phases for name in phase.weights})

    @cached_property
    def _starts(self) -> list[int]:
        # phase_at_step runs every training step; keep it a bisect, not a rebuild of the boundaries.
        return [b.start_step for b in self.boundaries()]

    def boundaries(self) -> list[PhaseBoundary]:
        """Each phase's global step and token range."""
        out, start = [], 0
        for index, (phase, n) in enumerate(zip(self.phases, self.steps)):
            tps = self.tokens_per_step
            out.append(PhaseBoundary(index, phase.name, start, start + n, start * tps, (start + n) * tps))
            start += n
        return out

    def phase_index(self, name: str) -> int:
        """Index of the phase called `name`."""
        for index, phase in enumerate(self.phases):
            if phase.name == name:
                return index
        raise ValueError(f"no phase named {name!r} (phases: {[p.name for p in self.phases]})")

    def phase_at_step(self, step: int) -> tuple[int, PhaseSpec, int]:
        """(phase index, phase, step within the phase) of global step `step`."""
        if step < 0 or step >= self.total_steps:
            raise ValueError(f"step {step} is outside the plan's {self.total_steps} steps")
        index = bisect.bisect_right(self._starts, step) - 1
        return index, self.phases[index], step - self._starts[index]

    def lr_at_step(self, step: int) -> float:
        """Scheduled LR of global step `step`; each phase runs its own segment, so phases re-warm."""
        index, phase, in_phase = self.phase_at_step(step)
        return lr_at(phase.lr, in_phase, self.steps[index])

    def report(self) -> str:
        """Human-readable table of requested vs realized tokens per phase."""
        header = ("phase", "steps", "global steps", "requested tokens", "realized tokens", "delta", "delta %")
        rows = []
        for rounding, boundary in zip(self.rounding, self.boundaries()):
            pct = 100.0 * rounding.delta_tokens / rounding.requested_tokens
            rows.append((
                rounding.name,
                f"{rounding.steps:,}",
                f"[{boundary.start_step:,}, {boundary.end_step:,})",
                f"{rounding.requested_tokens:,}",
                f"{rounding.realized_tokens:,}",
                f"{rounding.delta_tokens:+,}",
                f"{pct:+.4f}",
            ))
        requested = sum(r.requested_tokens for r in self.rounding)
        rows.append((
            "total", f"{self.total_steps:,}", "", f"{requested:,}", f"{self.total_tokens:,}",
            f"{self.total_tokens - requested:+,}", f"{100.0 * (self.total_tokens - requested) / requested:+.4f}",
        ))
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        lines = [
            f"tokens per step = {self.global_batch_size:,} x {self.seq_length:,} = {self.tokens_per_step:,}",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        ]
        lines += ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                  for row in rows]
        return "\n".join(lines)
