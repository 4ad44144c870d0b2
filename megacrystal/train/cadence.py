"""What happens after each step (log, evaluate, checkpoint, stop), decided in one place from the config's
intervals, the plan's phase ends, `train.max_steps` and stop requests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Why a run ends after a step: the plan is done, train.max_steps is reached, or a stop request (signal, time limit)
End = Literal["plan", "max_steps", "stop_request"]


@dataclass(frozen=True)
class Actions:
    """What to do after one step."""

    log: bool  # print the progress line
    eval: bool  # run the held-out evaluation (its losses go into the step's record)
    checkpoint: bool
    phase_end: bool  # the step ends a phase (its checkpoint is kept beyond checkpoint.keep)
    end: End | None = None  # the run ends after this step, and why; None: it goes on


@dataclass(frozen=True)
class Cadence:
    """Per-step decisions for a run of `total_steps` (steps counted from 1 = the number of steps done)."""

    total_steps: int
    phase_ends: frozenset[int]  # the steps that end a phase (the last step among them)
    log_interval: int = 1
    eval_interval: int | None = None  # None or 0: evaluate at phase ends only
    evaluates: bool = True  # False: no validation data, never evaluate
    checkpoint_interval: int | None = None
    checkpoint_phase_end: bool = True
    max_steps: int | None = None  # stop (with a checkpoint) after this step, short of the plan's end

    @classmethod
    def for_run(cls, config, plan, evaluates: bool) -> Cadence:
        """The cadence of a run from its config and RunPlan."""
        return cls(total_steps=plan.total_steps, phase_ends=frozenset(b.end_step for b in plan.boundaries()),
                   log_interval=config.train.log_interval, eval_interval=config.data.eval_interval,
                   evaluates=evaluates, checkpoint_interval=config.checkpoint.interval,
                   checkpoint_phase_end=config.checkpoint.phase_end, max_steps=config.train.max_steps)

    @property
    def last_step(self) -> int:
        """The step the run ends at if nothing stops it first: the plan's last, or train.max_steps if sooner."""
        return min(self.total_steps, self.max_steps) if self.max_steps else self.total_steps

    def decide(self, step: int, stop_requested: bool = False) -> Actions:
        """The actions after `step` steps are done; `stop_requested`: every rank agreed to stop at this step."""
        phase_end = step in self.phase_ends
        if step >= self.total_steps:
            end = "plan"
        elif step >= self.last_step:
            end = "max_steps"  # before a stop request at the same step: the asked-for work is done, exit cleanly
        elif stop_requested:
            end = "stop_request"
        else:
            end = None
        evaluate = self.evaluates and (_every(step, self.eval_interval) or phase_end)
        return Actions(
            log=_every(step, self.log_interval) or evaluate or end is not None,
            eval=evaluate,
            checkpoint=_every(step, self.checkpoint_interval) or (phase_end and self.checkpoint_phase_end)
            or end is not None,
            phase_end=phase_end,
            end=end,
        )


def _every(step: int, interval: int | None) -> bool:
    return bool(interval) and step % interval == 0
