"""Train the tiny Crystal with online mixing, session after session, in this process group (spawned by the tests)."""
from __future__ import annotations

from pathlib import Path

from megacrystal.config import load_config
from megacrystal.train.loop import train

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "crystal-tiny.yaml")


def train_sessions(sessions: list[tuple[str, list[str]]]) -> list[list[tuple]]:
    """Run `train` for each (run dir, overrides) in order (a later session in the same run dir resumes the
    earlier one); return each session's (step, loss, blend weights) as this rank saw them."""
    out = []
    for run_dir, overrides in sessions:
        records = train(load_config(TINY, [f"run.dir={run_dir}", *overrides]))
        out.append([(r.step, r.loss, r.blend_weights) for r in records])
    return out
