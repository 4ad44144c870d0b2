"""PNG plots of a run directory: planned vs realized blend, training loss, per-dataset validation loss."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, load_config
from ..schedule.from_config import plan_for


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl; pass the run.dir of a training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _planned(plan, datasets: list[str], tokens: list[int]) -> dict[str, list[float]]:
    """Tokens the plan assigns each dataset up to each point (phases' weights x tokens inside the phase)."""
    out = {d: [] for d in datasets}
    bounds = plan.boundaries()
    for t in tokens:
        for d in datasets:
            total = 0.0
            for b, phase in zip(bounds, plan.phases):
                inside = max(0, min(t, b.end_token) - b.start_token)
                total += phase.weights.get(d, 0.0) * inside
            out[d].append(total)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write blend.png, loss.png, loss_per_dataset.png and (when evaluated) val_loss.png, val_bpb.png; return paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = _records(run_dir)
    plan = plan_for(load_config(run_dir / "config.resolved.yaml"))
    boundaries = [b.end_token for b in plan.boundaries()[:-1]]
    tokens = [r["tokens"] for r in records]
    written = []

    def finish(ax, name: str, title: str, ylabel: str) -> None:
        for x in boundaries:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.figure.tight_layout()
        path = run_dir / name
        ax.figure.savefig(path, dpi=110)
        plt.close(ax.figure)
        written.append(path)

    datasets = sorted({d for r in records for d in r.get("consumed_tokens", {})})
    if datasets:
        _, ax = plt.subplots(figsize=(7, 4))
        planned = _planned(plan, datasets, tokens)
        for i, d in enumerate(datasets):
            color = f"C{i}"
            ax.plot(tokens, [r["consumed_tokens"].get(d, 0) for r in records], color=color, label=f"{d} realized")
            ax.plot(tokens, planned[d], color=color, linestyle="--", label=f"{d} planned")
        finish(ax, "blend.png", "Tokens per dataset: planned vs realized", "tokens consumed")

    _, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, [r["loss"] for r in records], label="train loss")
    finish(ax, "loss.png", "Training loss (phase boundaries dotted)", "loss (nats/token)")

    per_dataset = [r for r in records if "loss_per_dataset" in r]
    if per_dataset:  # per-domain training loss; the dotted phase boundaries show each phase's share of it
        _, ax = plt.subplots(figsize=(7, 4))
        for d in sorted({d for r in per_dataset for d in r["loss_per_dataset"]}):
            points = [(r["tokens"], r["loss_per_dataset"][d]) for r in per_dataset if d in r["loss_per_dataset"]]
            ax.plot(*zip(*points), linewidth=0.8, label=d)
        finish(ax, "loss_per_dataset.png", "Training loss per dataset (phase boundaries dotted)", "loss (nats/token)")

    bpb = [r for r in records if "bpb_per_dataset" in r]
    if bpb:
        _, ax = plt.subplots(figsize=(7, 4))
        for d in sorted({d for r in bpb for d in r["bpb_per_dataset"]}):
            ax.plot([r["tokens"] for r in bpb], [r["bpb_per_dataset"].get(d) for r in bpb], marker="o", label=d)
        finish(ax, "val_bpb.png", "Validation bits per byte per dataset (phase boundaries dotted)", "bits per byte")

    evals = [r for r in records if "val_loss" in r]
    if evals:
        _, ax = plt.subplots(figsize=(7, 4))
        for d in sorted({d for r in evals for d in r["val_loss"]}):
            ax.plot([r["tokens"] for r in evals], [r["val_loss"].get(d) for r in evals], marker="o", label=d)
        finish(ax, "val_loss.png", "Validation loss per dataset (phase boundaries dotted)", "loss (nats/token)")
    return written
