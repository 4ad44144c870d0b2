"""Plans that are valid but probably not what the operator meant: one warning line each, printed at the start."""
from __future__ import annotations

from ..config import Config
from .plan import RunPlan

PHASE_KEY = "data.phases."


def plan_warnings(config: Config, plan: RunPlan) -> list[str]:
    """A phase whose LR warmup outlasts it, and one shorter than a checkpoint interval."""
    out = []
    interval = config.checkpoint.interval
    for phase, steps in zip(plan.phases, plan.steps):
        where = f"phase {phase.name}" if config.data.phases else "the run"
        key = f"data.phases.{phase.name}.lr.warmup_steps" if config.data.phases else "optim.warmup_steps"
        if phase.lr.warmup_steps > steps:
            out.append(f"{key} = {phase.lr.warmup_steps} is longer than {where} ({steps} steps): its LR never "
                       f"reaches the peak {phase.lr.peak:g}")
        if interval and steps < interval and len(plan.phases) > 1:
            out.append(f"{where} has {steps} steps, fewer than checkpoint.interval = {interval}: no interval "
                       f"checkpoint falls inside it" + ("" if config.checkpoint.phase_end else
                                                        " and checkpoint.phase_end is off, so a stop there loses it"))
    return out


def override_notes(overrides: list[str], plan: RunPlan, resume_step: int | None) -> list[str]:
    """Where each `--set data.phases.<name>....` takes effect, given the step a resumed run starts at.

    A phase that the run has finished is not trained again, so its override does nothing (a warning); one not
    started yet takes effect when it starts; the phase in progress from the resumed step on.
    """
    out = []
    bounds = {b.name: b for b in plan.boundaries()}
    start = resume_step or 0
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(PHASE_KEY):
            continue
        name = key[len(PHASE_KEY):].split(".", 1)[0]
        b = bounds.get(name)
        if b is None:
            continue
        if b.end_step <= start:
            out.append(f"warning: --set {key}: phase {name} (steps {b.start_step}-{b.end_step}) already finished "
                       f"before the resumed step {start}; this override changes nothing")
        elif b.start_step > start:
            out.append(f"--set {key} takes effect when phase {name} starts, at step {b.start_step}"
                       f"{' (the run resumes at step %d)' % start if resume_step else ''}")
        else:
            ran = start - b.start_step
            out.append(f"--set {key} takes effect in phase {name} from step {start}"
                       + (f" (resumed mid-phase; its first {ran} steps ran without it)" if ran else ""))
    return out
