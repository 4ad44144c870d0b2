"""torchrun for one node of a multi-node run, with what a batch system needs on top.

`python -m megacrystal.launch.torchrun TORCHRUN_ARGS -m megacrystal.launch.worker train ...` is torchrun, except:

- SIGUSR1 (SLURM's warning before the time limit, or `scancel --signal=USR1`), SIGTERM and SIGINT are forwarded to
  the trainer processes alone, which checkpoint at the next step boundary and exit 75. Plain torchrun dies of
  SIGUSR1, and answers SIGTERM/SIGINT by signalling each trainer's whole process group (megatron's checkpoint
  helpers included) and killing what is left after 30 s, which can cut the stop's own save short. The request is
  repeated every few seconds until they exit, because a trainer that is still starting ignores it until its stop
  handler is installed (see worker.py).
- The exit code says what happened: 0 done, 75 (EXIT_PREEMPTED) the trainers saved a checkpoint on a stop request
  and a relaunch with `--resume auto` continues, 1 a trainer failed (named in one `megacrystal: error:` line),
  128+N torchrun itself got signal N. Plain torchrun exits 1 for all of these.
- torch's agent can block for good on the c10d rendezvous store when the node hosting it is gone (its monitor
  loop queries the store before it looks at its own workers). Once every trainer on this node has exited and the
  agent has still not returned after $MEGACRYSTAL_AGENT_GRACE_S seconds (default 30), this exits 1 with a message.
- With $MEGACRYSTAL_NODE_STATUS set, the exit code is also written to that file, so a batch script can tell a
  stop from a failure even when srun reports another node's code.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil

REPEAT_S = 2.0  # how often a stop request is repeated to trainers that have not exited yet
EXIT_PREEMPTED = 75  # megacrystal.train.signals.EXIT_PREEMPTED (not imported: that module imports torch)
PEER_TROUBLE = ("timeout", "timed out", "connection", "closed by peer", "reset by peer", "pair closure")


def _say(message: str) -> None:
    print(f"megacrystal: {message}", file=sys.stderr, flush=True)


def _trainers(include_exited: bool = False) -> list[psutil.Process]:
    """This process's children: the trainer processes torchrun started (exited ones linger as zombies)."""
    children = []
    for child in psutil.Process().children():
        try:
            if include_exited or child.status() != psutil.STATUS_ZOMBIE:
                children.append(child)
        except psutil.Error:
            pass
    return children


def _handles_usr1(pid: int) -> bool:
    """Whether process `pid` ignores or catches SIGUSR1 (Linux: the SigIgn/SigCgt masks of /proc/PID/status)."""
    bit = 1 << (signal.SIGUSR1 - 1)
    try:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
        return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & bit)
    except (OSError, KeyError, ValueError):
        return True  # no /proc (not Linux): send as before


FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopForwarder:
    """Forwards stop signals to the trainers now and every REPEAT_S seconds after."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None

    def install(self) -> None:
        for signum in FORWARDED:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        _say(f"got {name}: asking the trainers to checkpoint at the next step and stop")
        if self.requested is None:
            self.requested = signal.Signals(signum)
            threading.Thread(target=self._repeat, name="stop-forwarder", daemon=True).start()
        self.forward(self.requested)

    @staticmethod
    def forward(signum: signal.Signals = signal.SIGUSR1) -> None:
        for child in _trainers():
            # A trainer still in interpreter start-up has SIGUSR1's default action (terminate) until worker.py
            # runs its first line; skip it now, the repeat reaches it once it ignores or handles the signal.
            if not _handles_usr1(child.pid):
                continue
            try:
                child.send_signal(signum)
            except psutil.Error:
                pass

    def _repeat(self) -> None:
        while True:
            time.sleep(REPEAT_S)
            self.forward(self.requested)


class StuckAgentWatchdog:
    """Ends this process when every trainer has exited but torch's agent does not return."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s

    def start(self) -> None:
        threading.Thread(target=self._watch, name="agent-watchdog", daemon=True).start()

    def _watch(self) -> None:
        seen, idle_since = False, None
        while True:
            time.sleep(1.0)
            alive = _trainers()
            seen = seen or bool(alive)
            if not seen or alive:
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > self.grace_s:
                codes = sorted({_exit_code(p) for p in _trainers(include_exited=True)} - {None})
                _say(f"error: the trainers on this node exited{f' (codes {codes})' if codes else ''} but torch's "
                     f"agent has not returned for {self.grace_s:.0f} s; it is probably waiting for a rendezvous "
                     "store on a node that is gone. Giving up on this node (exit 1)")
                _finish(1)


def _exit_code(process: psutil.Process) -> int | None:
    """The exit code of an exited (zombie) child, without reaping it from under torch."""
    try:
        with open(f"/proc/{process.pid}/stat") as f:
            status = int(f.read().rsplit(")", 1)[1].split()[49])
        return status >> 8 if status & 0x7F == 0 else -(status & 0x7F)
    except (OSError, ValueError, IndexError):
        return None


def _failure_line(err) -> str:
    """One line naming the first failed rank and its error (from the worker's error file when it has one)."""
    rank, failure = err.get_first_failure()
    if failure.exitcode < 0:
        what = f"was killed by {signal.Signals(-failure.exitcode).name}"
    else:
        what = f"exited with code {failure.exitcode}"
    message = failure.message
    if isinstance(message, dict):  # the worker's error file: {"message": "Type: text", "extraInfo": {...}}
        message = message.get("message", "")
    message = " ".join(str(message or "").split())
    if not message or message.startswith("To enable traceback"):
        if failure.exitcode == 2:  # megacrystal's own error exit: the one `megacrystal: error:` line above
            return (f"error: training failed on this node: rank {rank} {what} "
                    "(its `megacrystal: error:` line is above)")
        return f"error: training failed on this node: rank {rank} {what} (its traceback is above)"
    line = f"error: training failed on this node: rank {rank} {what}: {message[:400]}"
    if any(s in message.lower() for s in PEER_TROUBLE):
        limit = os.environ.get("MEGACRYSTAL_DIST_TIMEOUT_S")
        line += (" -- a peer stopped answering" + (f" for {limit} s (MEGACRYSTAL_DIST_TIMEOUT_S)" if limit else "")
                 + ": a node, its trainer or the network between the nodes failed; relaunch to resume from the"
                 " last checkpoint")
    return line


def run(argv: list[str]) -> int:
    """torchrun `argv`; the exit code as described in the module docstring."""
    StopForwarder().install()
    StuckAgentWatchdog(float(os.environ.get("MEGACRYSTAL_AGENT_GRACE_S", "30"))).start()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if not any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in argv):
        # torch's agent would install its own SIGTERM/SIGINT handlers (killpg + SIGKILL after 30 s) over ours.
        argv = ["--signals-to-handle", "SIGHUP,SIGQUIT", *argv]
    try:
        torchrun_main(argv)
        return 0
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if EXIT_PREEMPTED in codes:
            _say(f"the trainers saved a checkpoint on a stop request and stopped (exit {EXIT_PREEMPTED}); "
                 "relaunch with --resume auto to continue")
            return EXIT_PREEMPTED
        print(err, file=sys.stderr)
        _say(_failure_line(err))
        return 1
    except SignalException as err:
        _say(f"torchrun got {err.sigval.name} and stopped the trainers")
        return 128 + int(err.sigval)


def _finish(code: int) -> None:
    """Record the exit code where $MEGACRYSTAL_NODE_STATUS says, then exit at once."""
    status = os.environ.get("MEGACRYSTAL_NODE_STATUS")
    if status:
        try:
            with open(status, "w") as f:
                f.write(f"{code}\n")
        except OSError as err:
            _say(f"could not write the node status file {status}: {err}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m megacrystal.launch.torchrun TORCHRUN_ARGS`."""
    _finish(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
