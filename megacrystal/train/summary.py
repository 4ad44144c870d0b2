"""The end-of-run summary: steps, tokens per phase and dataset, final losses, time and where the outputs are."""
from __future__ import annotations

from pathlib import Path

from .records import StepRecord


def tokens_by_phase(records: list[StepRecord]) -> dict[str, dict[str, int]]:
    """{phase: {dataset: tokens trained}} in run order, from each step's per-dataset samples."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        per_step = r.tokens // r.step  # constant over a run: global batch x sequence length
        drawn = sum(r.samples.values())
        row = out.setdefault(r.phase, {})
        for name, n in r.samples.items():
            row[name] = row.get(name, 0) + n * per_step // max(drawn, 1)
        if not r.samples:
            row["all"] = row.get("all", 0) + per_step
    return out


def run_summary(records: list[StepRecord], first_step: int, wall_s: float, ended: str,
                checkpoint: str | None, plots: list[Path], metrics: Path) -> str:
    """The summary lines of a run whose records (all of it, from step 1) are `records`; this session ran the
    steps after `first_step` in `wall_s` seconds of wall time."""
    if not records:
        return f"run summary: no steps recorded ({ended})"
    last = records[-1]
    session = [r for r in records if r.step > first_step]
    per_phase = tokens_by_phase(records)
    datasets = sorted({d for row in per_phase.values() for d in row})
    lines = [f"run summary ({ended}): {last.step:,} steps, {last.tokens:,} tokens"
             + (f"; this session steps {first_step + 1}-{last.step}" if first_step else "")]
    width = max(len(name) for name in [*per_phase, *datasets, "dataset"]) + 2
    lines.append("  " + "tokens".ljust(width) + "".join(d.rjust(width) for d in datasets) + "total".rjust(width))
    for phase, row in [*per_phase.items(), ("total", _add(per_phase.values()))]:
        cells = [f"{row.get(d, 0):,}".rjust(width) for d in datasets]
        lines.append("  " + phase.ljust(width) + "".join(cells) + f"{sum(row.values()):,}".rjust(width))
    evals = [r for r in records if r.eval is not None]
    loss = f"  final loss: train {last.loss:.4f} (step {last.step})"
    if evals:
        val = evals[-1].eval.loss_per_dataset
        loss += " | val " + " ".join(f"{d} {v:.4f}" for d, v in val.items()) + f" (step {evals[-1].step})"
    lines.append(loss)
    if session:
        step_s = sum(r.step_time_s for r in session)
        tokens = sum(r.tokens // r.step for r in session)
        lines.append(f"  time: {_duration(wall_s)} wall for {len(session):,} steps; {tokens / step_s:,.0f} tokens/s "
                     f"in steps ({step_s:.1f} s), {tokens / wall_s:,.0f} tokens/s over the wall time")
    lines.append(f"  checkpoint: {checkpoint or 'none saved this session'}")
    lines.append(f"  metrics: {metrics}")
    if plots:
        lines.append(f"  plots: {', '.join(str(p) for p in plots)}")
    return "\n".join(lines)


def _add(rows) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for name, n in row.items():
            total[name] = total.get(name, 0) + n
    return total


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
