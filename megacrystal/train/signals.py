"""Stop requests (signals, a wall-clock budget) that all ranks agree on at a step boundary."""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

# Documented in the README: a checkpoint was saved because of a stop request; relaunch with --resume auto.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL


class Preempted(Exception):
    """Raised after the checkpoint that a stop request asked for has been committed."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped at step {step} ({reason}); checkpoint saved, resume with --resume auto")
        self.step, self.reason = step, reason


class StopWatch:
    """Records stop signals and checks the time budget; `should_stop()` is a collective over all ranks."""

    def __init__(self, signal_names: list[str], time_limit_s: float | None, device: torch.device):
        self.reason: str | None = None
        self.deadline = time.monotonic() + time_limit_s if time_limit_s else None
        self.device = device
        self._previous = {}
        for name in signal_names:
            signum = signal.Signals[name]
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only note it: saving from inside a signal handler would race the step in progress.
        self.reason = signal.Signals(signum).name

    def should_stop(self, seconds_per_step: float, memory_mb: float = 0.0) -> tuple[str | None, float]:
        """(reason to stop or None, the largest `memory_mb` of all ranks), in one collective.

        Stop when any rank got a stop signal or the budget cannot fit another step plus a save.
        """
        if self.reason is None and self.deadline is not None:
            if time.monotonic() + 2 * seconds_per_step > self.deadline:
                self.reason = "time limit"
        values = torch.tensor([1.0 if self.reason else 0.0, memory_mb], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        reason = (self.reason or "stop request on another rank") if values[0].item() > 0 else None
        return reason, values[1].item()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
