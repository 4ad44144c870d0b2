"""One phase's learning-rate segment: warmup to a peak, then a linear or cosine decay, then constant."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

LRStyle = Literal["linear", "cosine"]
_STYLES = ("linear", "cosine")


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
    """Warmup from `start` to `peak` over `warmup_steps`, decay to `end` over `decay_steps`, then hold `end`.

    Step convention (Cerebras Model Zoo's "Linear" scheduler, which trained Crystal): the LR used by the
    optimizer step with 0-based index `s` inside the phase is `start + (peak - start) * s / warmup_steps`
    during warmup, so step 0 uses `start` (0.0 for Crystal) and step `warmup_steps` uses `peak`.
    `decay_steps=None` decays over the rest of the phase; a value longer than the phase is allowed
    (Crystal phase 1 decays over 294,337 steps but stops at 79,721, so the LR is cut mid-decay).
    """

    peak: float
    warmup_steps: int
    end: float
    decay_steps: int | None = None
    start: float = 0.0
    style: LRStyle = "linear"

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

    def decay_length(self, phase_steps: int | None) -> int:
        """Number of decay steps, resolving `decay_steps=None` against the phase length."""
        if self.decay_steps is not None:
            return self.decay_steps
        if phase_steps is None:
            raise ValueError("LRSegment.decay_steps is None (decay over the phase), so phase_steps is required")
        return max(0, phase_steps - self.warmup_steps)


def lr_at(segment: LRSegment, step_in_phase: int, phase_steps: int | None = None) -> float:
    """Learning rate of the optimizer step `step_in_phase` (0-based) of a phase with `phase_steps` steps."""
    if step_in_phase < 0:
        raise ValueError(f"step_in_phase must be >= 0, got {step_in_phase}")
    if step_in_phase < segment.warmup_steps:
        return segment.start + (segment.peak - segment.start) * step_in_phase / segment.warmup_steps
    decay = segment.decay_length(phase_steps)
    since_peak = step_in_phase - segment.warmup_steps
    if since_peak >= decay:
        # Covers decay == 0 too: the LR drops to `end` right after warmup.
        return float(segment.end)
    frac = since_peak / decay
    if segment.style == "linear":
        return segment.peak + (segment.end - segment.peak) * frac
    return segment.end + (segment.peak - segment.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
