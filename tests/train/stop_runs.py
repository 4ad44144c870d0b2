"""Stop signals at random steps, on every rank of one process group: each stop must leave a verified checkpoint
of the last finished step, and the resumed run must continue from it (spawned by tests/train/test_preemption.py).

A stop signal is delivered the way torchrun's agent, SLURM and a terminal deliver it: to the rank *and every
process it started* (megatron's checkpoint Manager and writers), which is what turned a stop into
"checkpoint save of step_... failed: Broken pipe".
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import torch.distributed as dist

from megacrystal.checkpoint import CheckpointStore
from megacrystal.checkpoint.manifest import verify
from megacrystal.config import config_from_dict
from megacrystal.train.loop import train
from megacrystal.train.signals import Preempted, note_early_stops

CONFIG = {
    "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 48, "vocab_size": 64,
              "seq_length": 16},
    "optim": {"lr": 0.01, "warmup_steps": 2},
    "train": {"global_batch_size": 4, "micro_batch_size": 1, "threads": 1, "log_interval": 1000},
    "checkpoint": {"interval": 2, "keep": 2},
}
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def _config(run_dir: Path, steps: int):
    config = {section: dict(values) for section, values in CONFIG.items()}
    config["train"]["steps"] = steps
    config["run"] = {"dir": str(run_dir)}
    return config_from_dict(config)


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _saving(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and any(p.name.startswith(".tmp-") for p in ckpt.iterdir())


def _deliver(name: str) -> None:
    """The signal to this process and all its descendants, as a process-group signal would reach them."""
    signum = signal.Signals[name]
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass
    os.kill(os.getpid(), signum)


def _arm(run_dir: Path, at_step: int | None, done: threading.Event, name: str) -> threading.Thread:
    """A thread that sends `name` once `at_step` steps are logged (None: as soon as a save is in progress)."""
    def wait_and_fire():
        while not done.is_set():
            if (_saving(run_dir) if at_step is None else _steps_logged(run_dir) >= at_step):
                _deliver(name)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=wait_and_fire, daemon=True)
    thread.start()
    return thread


def stop_loop(root: str, stops: int, seed: int) -> dict:
    """Train with `stops` stop signals at random steps (some during a save) on random ranks, resuming after each;
    then to the end. Returns what rank 0 saw; rank 0 also runs the same config uninterrupted as the reference."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    steps = 3 * stops + 6
    os.environ["MEGACRYSTAL_CKPT_TEST_PAUSE"] = "before_rename:0.2"  # a save lasts long enough to hit
    rng = random.Random(seed)  # the same plan on every rank
    run = root / "stopped"
    events, problems = [], []
    for i in range(stops):
        start = _steps_logged(run)
        during_save = i % 3 == 1
        at = None if during_save else start + rng.randint(0, 2)
        target = rng.choice(["all", *range(world)])
        name = SIGNALS[i % len(SIGNALS)]
        done = threading.Event()
        note_early_stops(SIGNALS)  # as the CLI does before training: a signal during start-up is kept
        thread = _arm(run, at, done, name) if target in ("all", rank) else None
        try:
            train(_config(run, steps), resume="auto")
            problems.append(f"stop {i}: the run ended without stopping")
        except Preempted as stop:
            latest = CheckpointStore(run / "checkpoints", recover=False).latest()
            logged = _steps_logged(run)
            verify(latest, deep=True)  # every file's SHA-256 against the manifest
            state = json.loads((latest / "trainer_state.json").read_text())
            events.append({"signal": name, "target": target, "during_save": during_save, "resumed_at": start,
                           "stopped_at": stop.step, "checkpoint": state["step"], "logged": logged})
            if not state["step"] == stop.step == logged:
                problems.append(f"stop {i} ({name} to {target}): stopped at {stop.step}, {logged} steps logged, "
                                f"checkpoint of step {state['step']}")
        finally:
            done.set()
            if thread is not None:
                thread.join()
        # Nothing in flight may survive into the next start, and every helper process must still be alive.
        dead = [p.pid for p in psutil.Process().children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
        if dead:
            problems.append(f"stop {i}: helper processes died: {dead}")
    train(_config(run, steps), resume="auto")
    reference = root / "reference"
    train(_config(reference, steps), resume="none")
    losses = {}
    for name in ("stopped", "reference"):
        records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], r["loss"]) for r in records]
    return {"events": events, "problems": problems, "losses": losses, "steps": steps}
