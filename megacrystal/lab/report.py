"""The ablation report: per-domain BPB per variant and per phase side by side (markdown + JSON) and PNG plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import load_config
from ..schedule.from_config import plan_for
from ..train.records import read_records
from .grid import Grid
from .runner import DONE, is_done, run_dir

SMOOTH = 10  # steps in the moving average of the plotted training losses


def mixture(plan, records=()) -> dict[str, float]:
    """The run's overall mixture: each dataset's share of all tokens, over every phase. A fixed phase counts its
    weights; an online-mixing phase the tokens it drew (the records' cumulative consumed_tokens at its ends), since
    its weights moved during the run (its configured weights when those records are missing)."""
    consumed = {r.step: r.consumed_tokens for r in records}
    consumed[0] = {}
    total = {}
    for phase, steps, bounds in zip(plan.phases, plan.steps, plan.boundaries()):
        weights = phase.weights
        start, end = consumed.get(bounds.start_step), consumed.get(bounds.end_step)
        if phase.mixing is not None and start is not None and end:
            drawn = {name: n - start.get(name, 0) for name, n in end.items() if n > start.get(name, 0)}
            weights = {name: n / sum(drawn.values()) for name, n in drawn.items()}
        for name, w in weights.items():
            total[name] = total.get(name, 0.0) + w * steps / plan.total_steps
    return dict(sorted(total.items()))


def variant_results(where: Path) -> dict:
    """One variant's per-phase evaluation (at each phase end), its mixture and its training-loss curves."""
    config = load_config(where / "config.resolved.yaml")
    plan = plan_for(config)
    records = read_records(where)
    by_step = {r.step: r for r in records}
    phases = {}
    for boundary in plan.boundaries():
        r = by_step.get(boundary.end_step)
        if r and r.eval is not None:
            phases[boundary.name] = {"step": boundary.end_step, "val_loss": r.eval.loss_per_dataset, "bpb": r.eval.bpb,
                                     "bpb_per_dataset": r.eval.bpb_per_dataset or {}}
    return {
        "phase_weights": {p.name: dict(p.weights) for p in plan.phases},
        "phase_ends": [b.end_step for b in plan.boundaries()],
        "mixture": mixture(plan, records),
        "phases": phases,
        "train_loss_per_dataset": {str(r.step): r.loss_per_dataset for r in records if r.loss_per_dataset},
    }


def collect(grid: Grid, out: Path) -> dict[str, dict]:
    """Results of every finished variant, in grid order (with the wall time of the call that finished it)."""
    results = {}
    for v in grid.variants:
        if is_done(out, v):
            results[v.name] = variant_results(run_dir(out, v))
            results[v.name]["seconds"] = json.loads((run_dir(out, v) / DONE).read_text()).get("seconds")
    return results


def markdown(results: dict[str, dict], fit: dict | None = None) -> str:
    """Tables: per phase, per-domain BPB (and the pooled BPB) of each variant; then the fit, if any."""
    lines = ["# Ablation report", ""]
    phase_names = list(dict.fromkeys(p for r in results.values() for p in r["phases"]))
    domains = sorted({d for r in results.values() for p in r["phases"].values() for d in p["bpb_per_dataset"]})
    seconds = [r.get("seconds") or 0.0 for r in results.values()]
    lines += [f"{len(results)} variants, {sum(seconds) / 60:.1f} minutes of training (the last call of each).", "",
              "Validation bits per byte at the end of each phase (lower is better).", ""]
    header = ["variant", "mixture"] + [f"{p}: {d}" for p in phase_names for d in [*domains, "all"]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [name, ", ".join(f"{d} {w:.3f}" for d, w in r["mixture"].items() if w > 0)]
        for p in phase_names:
            ev = r["phases"].get(p, {})
            per = ev.get("bpb_per_dataset", {})
            cells += [f"{per[d]:.4f}" if d in per else "-" for d in domains]
            cells.append(f"{ev['bpb']:.4f}" if ev.get("bpb") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if fit:
        lines += ["", "## Fitted mixture", "", fit["method"], "",
                  f"Target: {fit['target_description']}.", "",
                  "| held-out variant | predicted | measured | error |", "|---|---|---|---|"]
        for row in fit["held_out"]:
            lines.append(f"| {row['variant']} | {row['predicted']:.4f} | {row['measured']:.4f} | "
                         f"{row['predicted'] - row['measured']:+.4f} |")
        proposal = fit["proposal"]
        lines += ["", "Proposed mixture (minimum predicted target inside the fitted range): " +
                  ", ".join(f"{d} {w:.3f}" for d, w in proposal["weights"].items()) +
                  f"; predicted target {proposal['predicted']:.4f}."]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plots(results: dict[str, dict], out: Path) -> list[Path]:
    """loss_per_domain.png (training loss per domain, variants overlaid) and bpb_heatmap.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    domains = sorted({d for r in results.values() for s in r["train_loss_per_dataset"].values() for d in s})
    if domains:
        fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.8), squeeze=False)
        for ax, domain in zip(axes[0], domains):
            for i, (name, r) in enumerate(results.items()):
                points = [(int(s), v[domain]) for s, v in r["train_loss_per_dataset"].items() if domain in v]
                if not points:
                    continue
                steps, values = zip(*sorted(points))
                # Trailing mean over up to SMOOTH steps (fewer at the start), one point per logged step.
                sums = np.cumsum(np.concatenate([[0.0], values]))
                lo = np.maximum(0, np.arange(1, len(values) + 1) - SMOOTH)
                smooth = (sums[1:] - sums[lo]) / (np.arange(1, len(values) + 1) - lo)
                ax.plot(steps, smooth, color=f"C{i}", label=name, marker="." if len(steps) < 30 else None)
                for end in r["phase_ends"][:-1]:
                    ax.axvline(end, color=f"C{i}", linestyle=":", linewidth=0.8)
            ax.set_title(f"{domain}: training loss ({SMOOTH}-step mean)")
            ax.set_xlabel("step")
            ax.set_ylabel("nats/token")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "loss_per_domain.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    finals = {name: list(r["phases"].values())[-1]["bpb_per_dataset"] for name, r in results.items() if r["phases"]}
    eval_domains = sorted({d for v in finals.values() for d in v})
    if finals and eval_domains:
        grid = np.array([[finals[n].get(d, np.nan) for d in eval_domains] for n in finals])
        # Colour: % above the best variant of each domain (domains differ by far more than variants do).
        above = 100 * (grid / np.nanmin(grid, axis=0) - 1)
        fig, ax = plt.subplots(figsize=(1.6 * len(eval_domains) + 2.5, 0.5 * len(finals) + 1.8))
        image = ax.imshow(above, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(eval_domains)), eval_domains)
        ax.set_yticks(range(len(finals)), list(finals))
        for (i, j), value in np.ndenumerate(grid):
            light = above[i, j] > 0.6 * np.nanmax(above)  # dark text on the bright end of the colour map
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="black" if light else "white", fontsize=8)
        fig.colorbar(image, ax=ax, label="% above the domain's best variant")
        ax.set_title("Final validation BPB (values): variants x domains")
        fig.tight_layout()
        path = out / "bpb_heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(grid: Grid, out: str | Path, fit: dict | None = None) -> list[Path]:
    """report.json, report.md and the plots in `out`; returns their paths."""
    out = Path(out)
    results = collect(grid, out)
    body = {"grid": str(grid.path), "base": str(grid.base),
            "variants": {n: {k: v for k, v in r.items() if k != "train_loss_per_dataset"} for n, r in results.items()},
            "fit": fit}
    _atomic_write(out / "report.json", json.dumps(body, indent=1))
    _atomic_write(out / "report.md", markdown(results, fit))
    return [out / "report.json", out / "report.md", *plots(results, out)]
