"""The RunPlan of a config: its phases, or one implicit phase over train.steps."""
from __future__ import annotations

from ..config import Config, ConfigError
from .lr import LRSegment
from .plan import MixingSpec, PhaseSpec, RunPlan

SYNTHETIC = "synthetic"  # the dataset name of the synthetic stream


def plan_for(config: Config) -> RunPlan:
    """Build (and validate) the run's phase plan."""
    d, t, m = config.data, config.train, config.model
    if d.phases:
        phases = [PhaseSpec(name=name, tokens=p.tokens, weights=dict(p.weights), lr=LRSegment(**p.lr.model_dump()),
                            fim_rate=p.fim_rate, weights_only_start=p.weights_only_start, mixing=_mixing(p.mixing))
                  for name, p in d.phases.items()]
    else:
        o = config.optim
        phases = [PhaseSpec(name="main", tokens=t.steps * t.global_batch_size * m.seq_length,
                            weights={SYNTHETIC: 1.0},
                            lr=LRSegment(peak=o.lr, warmup_steps=o.warmup_steps, end=o.end_lr, style=o.decay_style,
                                         decay_fraction=o.decay_fraction))]
    try:
        return RunPlan.build(phases, t.global_batch_size, m.seq_length, renormalize=d.renormalize)
    except ValueError as err:
        raise ConfigError(f"data.phases: {err}") from None


def _mixing(section) -> MixingSpec | None:
    """A phase's online mixing, or None when its weights are fixed."""
    if section is None or section.mode == "static":
        return None
    return MixingSpec(**section.model_dump(exclude={"mode"}))
