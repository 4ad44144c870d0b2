"""Ending a launcher we started together with everything under it."""
from __future__ import annotations

import subprocess

import psutil


def kill_tree(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Kill `proc` and all its descendants by PID (torchrun starts its trainers in sessions of their own, so a
    process-group signal would miss them), then reap `proc`."""
    if proc.poll() is None:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
