"""One phase's learning-rate segment: warmup to a peak, an optional stable part, a decay, then constant.

Two shapes share one segment:
- "decay" (Crystal's): warmup, then decay right away over `decay_steps` (or the rest of the phase);
- WSD (warmup-stable-decay, Hägele et al. 2024): warmup, hold the peak, and decay over the last
  `decay_fraction` of the phase. A phase with `decay_fraction: 0` never decays (the stable phase before a
  cooldown phase); a cooldown phase is a segment with no warmup that decays over its whole length.
Decay shapes: linear, cosine, and 1-sqrt (lr = end + (peak - end) * (1 - sqrt(t)), t the decay fraction done).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

LRStyle = Literal["linear", "cosine", "1-sqrt"]
_STYLES = ("linear", "cosine", "1-sqrt")


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; a YAML `true` in a step count is a config mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"LRSegment.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"LRSegment.{name} must be >= {minimum}, got {value}")


def _check_rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"LRSegment.{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"LRSegment.{name} must be finite and >= 0, got {value}")


@dataclass(frozen=True)
class LRSegment:
    """Warmup from `start` to `peak` over `warmup_steps`, (hold `peak`,) decay to `end`, then hold `end`.

    Step convention (Cerebras Model Zoo's "Linear" scheduler, which trained Crystal): the LR used by the
    optimizer step with 0-based index `s` inside the phase is `start + (peak - start) * s / warmup_steps`
    during warmup, so step 0 uses `start` (0.0 for Crystal) and step `warmup_steps` uses `peak`.
    `decay_steps=None` decays over the rest of the phase; a value longer than the phase is allowed
    (Crystal phase 1 decays over 294,337 steps but stops at 79,721, so the LR is cut mid-decay).
    `decay_fraction` (WSD) instead decays over the last round(f x phase steps) steps of the phase, holding
    `peak` between warmup and the decay; it excludes `decay_steps`.
    """

    peak: float
    warmup_steps: int
    end: float
    decay_steps: int | None = None
    start: float = 0.0
    style: LRStyle = "linear"
    decay_fraction: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        _check_rate("peak", self.peak)
        _check_rate("end", self.end)
        _check_rate("start", self.start)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.decay_steps is not None:
            _check_int("decay_steps", self.decay_steps, 0)
        if self.style not in _STYLES:
            raise ValueError(f"LRSegment.style must be one of {_STYLES}, got {self.style!r}")
        f = self.decay_fraction
        if f is not None:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
                raise ValueError(f"LRSegment.decay_fraction must be in [0, 1], got {f!r}")
            if self.decay_steps is not None:
                raise ValueError("LRSegment.decay_fraction and decay_steps exclude each other; set one of them")

    def decay_window(self, phase_steps: int | None) -> tuple[int, int]:
        """(first decay step, number of decay steps) inside the phase."""
        if self.decay_fraction is not None:
            if phase_steps is None:
                raise ValueError("LRSegment.decay_fraction is set, so phase_steps is required")
            # Round half up in exact arithmetic on the float's value: the last N% of the phase.
            length = min(phase_steps, math.floor(self.decay_fraction * phase_steps + 0.5))
            first = max(self.warmup_steps, phase_steps - length)
            return first, max(0, phase_steps - first)
        return self.warmup_steps, self.decay_length(phase_steps)

    def decay_length(self, phase_steps: int | None) -> int:
        """Number of decay steps, resolving `decay_steps=None` against the phase length."""
        if self.decay_fraction is not None:
            return self.decay_window(phase_steps)[1]
        if self.decay_steps is not None:
            return self.decay_steps
        if phase_steps is None:
            raise ValueError("LRSegment.decay_steps is None (decay over the phase), so phase_steps is required")
        return max(0, phase_steps - self.warmup_steps)


def decay_shape(style: str, frac: float) -> float:
    """How much of the way from peak (1.0) to end (0.0) is left after the fraction `frac` of the decay."""
    if style == "linear":
        return 1.0 - frac
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0 - math.sqrt(frac)


def lr_at(segment: LRSegment, step_in_phase: int, phase_steps: int | None = None) -> float:
    """Learning rate of the optimizer step `step_in_phase` (0-based) of a phase with `phase_steps` steps."""
    if step_in_phase < 0:
        raise ValueError(f"step_in_phase must be >= 0, got {step_in_phase}")
    if step_in_phase < segment.warmup_steps:
        return segment.start + (segment.peak - segment.start) * step_in_phase / segment.warmup_steps
    first, decay = segment.decay_window(phase_steps)
    if step_in_phase < first:
        return float(segment.peak)  # WSD's stable part
    since = step_in_phase - first
    if since >= decay:
        # Covers decay == 0 after a decay-style warmup too: the LR drops to `end` right after warmup.
        return float(segment.end)
    frac = since / decay
    if segment.style == "linear":  # the original expression, kept so Crystal's LRs stay bit-identical
        return segment.peak + (segment.end - segment.peak) * frac
    if segment.style == "cosine":
        return segment.end + (segment.peak - segment.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return segment.end + (segment.peak - segment.end) * decay_shape(segment.style, frac)
