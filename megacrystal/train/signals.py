"""Stop requests (signals, a wall-clock budget) that all ranks agree on at a step boundary.

A stop signal may reach every process of the trainer's process group at once: torchrun's agent answers its own
SIGTERM/SIGINT with `killpg(worker, sig)`, SLURM signals every process of a job step, a terminal sends Ctrl-C to
its foreground group. Megatron's checkpoint writer keeps helper processes in that group (a spawned
multiprocessing Manager that carries the write results, forked writers); killed by the signal, the save that the
stop asked for fails ("Broken pipe") or hangs until torchrun's SIGKILL. So saves run with the stop signals
blocked (`shielded`): helpers started meanwhile inherit the blocked mask and never see them, while this process
still gets them (a blocked signal stays pending; other threads take it).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time

import torch
import torch.distributed as dist

# Documented in the README: a checkpoint was saved because of a stop request; relaunch with --resume auto.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # what torchrun, SLURM and a terminal send to stop a run
_early_reason: str | None = None


class Preempted(Exception):
    """Raised after the checkpoint that a stop request asked for has been committed."""

    def __init__(self, step: int, reason: str, path: str | None = None):
        where = f"checkpoint {path} saved and verified" if path else "checkpoint saved"
        super().__init__(f"stopped at step {step} ({reason}); {where}, resume with --resume auto")
        self.step, self.reason, self.path = step, reason, path


@contextlib.contextmanager
def shielded(names=STOP_SIGNALS):
    """Block the stop signals in this thread for the block: processes started inside inherit them blocked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = {signal.Signals[n] for n in names}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    # multiprocessing starts its resource tracker on the first spawn and unblocks SIGINT/SIGTERM after that: start
    # it here, then block again, so the helpers of the first save inherit the mask too.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def note_early_stops(names=STOP_SIGNALS) -> None:
    """Before training starts (imports, loading): a stop signal is remembered instead of killing the process.

    The StopWatch of the loop takes it over, so the run stops after its first step with a checkpoint.
    """
    def note(signum, frame):
        global _early_reason
        _early_reason = signal.Signals(signum).name

    if threading.current_thread() is threading.main_thread():
        for name in names:
            signal.signal(signal.Signals[name], note)


class StopWatch:
    """Records stop signals and checks the time budget; `should_stop()` is a collective over all ranks."""

    def __init__(self, signal_names: list[str], time_limit_s: float | None, device: torch.device):
        global _early_reason
        self.reason, _early_reason = _early_reason, None  # a stop signalled before training started
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
        """Put the previous handlers back; after a stop request, ignore further stop signals instead: the
        process is on its way out, and a repeated signal (torchrun stopping the ranks that have not exited
        yet) must not kill it half-way through its exit."""
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.reason else handler)
