"""PNG plots of a run directory: planned vs realized blend, training loss, per-dataset validation loss.

Every plot has tokens trained on its x axis (in K/M/B) and the phases as named, alternately shaded spans.
"""
from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..schedule.from_config import plan_for
from .records import StepRecord, read_records


def format_tokens(n: float, _pos=None) -> str:
    """16384 -> '16.4K', 2.5e9 -> '2.5B' (a tick label: three significant digits at most)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale * 0.9995:  # 999,999 is '1M', not '1e+03K'
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def phase_spans(plan) -> list[tuple[str, int, int]]:
    """(phase name, first token, end token) of every phase, in run order."""
    return [(b.name, b.start_token, b.end_token) for b in plan.boundaries()]


def planned_tokens(plan, datasets: list[str], tokens: list[int]) -> dict[str, list[float]]:
    """Tokens the plan assigns each dataset up to each point (phases' weights x tokens inside the phase)."""
    out = {d: [] for d in datasets}
    for t in tokens:
        for d in datasets:
            out[d].append(sum(phase.weights.get(d, 0.0) * max(0, min(t, b.end_token) - b.start_token)
                              for b, phase in zip(plan.boundaries(), plan.phases)))
    return out


def step_weights(records: list[StepRecord], plan) -> list[dict[str, float]]:
    """The weights each step's batch was drawn with: its phase's, or those online mixing set for it."""
    fixed = {phase.name: phase.weights for phase in plan.phases}
    return [r.blend_weights if r.blend_weights is not None else fixed.get(r.phase, {}) for r in records]


def blend_series(records: list[StepRecord], plan) -> dict:
    """The blend plot's data: x = tokens trained (from 0), and per dataset the planned and realized cumulative
    tokens and their difference (realized - planned). With online mixing, "planned" follows the weights each
    step was drawn with."""
    datasets = sorted({d for r in records for d in r.consumed_tokens})
    tokens = [0, *(r.tokens for r in records)]
    if any(r.blend_weights is not None for r in records):
        planned = {d: [0.0] for d in datasets}
        for weights in step_weights(records, plan):
            for d in datasets:
                planned[d].append(planned[d][-1] + weights.get(d, 0.0) * plan.tokens_per_step)
    else:
        planned = planned_tokens(plan, datasets, tokens)
    series = {}
    for d in datasets:
        realized = [0, *(r.consumed_tokens.get(d, 0) for r in records)]
        series[d] = {"planned": planned[d], "realized": realized,
                     "deviation": [r - p for r, p in zip(realized, planned[d])]}
    return {"tokens": tokens, "datasets": series}


def _axes(fig, spans, rows: int = 1, ratios=None) -> list:
    """Axes sharing a token x axis, with the phases shaded and named (names on the top axes)."""
    from matplotlib.ticker import FuncFormatter

    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    for ax in axes:
        for i, (name, start, end) in enumerate(spans):
            if i % 2:
                ax.axvspan(start, end, color="grey", alpha=0.08, linewidth=0, zorder=0)
            if i:
                ax.axvline(start, color="grey", linestyle=":", linewidth=1, zorder=0.5)
        ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
        ax.grid(alpha=0.2)
    if spans:  # the whole plan, so every phase shows in full (and a run stopped early, where it stopped)
        pad = 0.01 * (spans[-1][2] - spans[0][1])
        axes[0].set_xlim(spans[0][1] - pad, spans[-1][2] + pad)
    top = axes[0]
    for name, start, end in spans:
        top.text((start + end) / 2, 1.01, name, transform=top.get_xaxis_transform(), ha="center", va="bottom",
                 fontsize=9, color="dimgrey")
    axes[-1].set_xlabel("tokens trained")
    return list(axes)


def blend_figure(records: list[StepRecord], plan):
    """Top: cumulative tokens per dataset, planned (wide pale band) under realized (thin line); bottom: their
    difference, which the top panel cannot show when the sampler keeps to plan."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    data = blend_series(records, plan)
    fig = Figure(figsize=(8, 5.5))
    top, bottom = _axes(fig, phase_spans(plan), rows=2, ratios=[3, 1.3])
    x = data["tokens"]
    for i, (d, s) in enumerate(data["datasets"].items()):
        color = f"C{i}"
        top.plot(x, s["planned"], color=color, linewidth=7, alpha=0.25, solid_capstyle="butt", zorder=2,
                 gid=f"planned:{d}")
        top.plot(x, s["realized"], color=color, linewidth=1.5, zorder=3, label=d, gid=f"realized:{d}")
        bottom.plot(x, s["deviation"], color=color, linewidth=1.2, zorder=3, gid=f"deviation:{d}")
    bottom.axhline(0, color="black", linewidth=0.8, zorder=1)
    style = [Line2D([], [], color="grey", linewidth=7, alpha=0.25, label="planned"),
             Line2D([], [], color="grey", linewidth=1.5, label="realized")]
    top.legend(handles=[*top.get_legend_handles_labels()[0], *style], fontsize=8, loc="upper left")
    top.yaxis.set_major_formatter(FuncFormatter(format_tokens))
    top.set_ylabel("tokens drawn")
    bottom.set_ylabel("realized - planned\n(tokens)", fontsize=8)
    fig.suptitle("Tokens per dataset: planned vs realized")
    return fig


def loss_figure(records: list[StepRecord], plan):
    """Training loss against tokens trained."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    (ax,) = _axes(fig, phase_spans(plan))
    ax.plot([r.tokens for r in records], [r.loss for r in records], label="train loss", gid="train")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    fig.suptitle("Training loss")
    return fig


def val_loss_figure(records: list[StepRecord], plan):
    """Validation loss per dataset at each evaluation; None when the run never evaluated."""
    from matplotlib.figure import Figure

    evals = [r for r in records if r.eval is not None]
    if not evals:
        return None
    fig = Figure(figsize=(8, 4))
    (ax,) = _axes(fig, phase_spans(plan))
    for d in sorted({d for r in evals for d in r.eval.loss_per_dataset}):
        ax.plot([r.tokens for r in evals], [r.eval.loss_per_dataset.get(d) for r in evals], marker="o", label=d,
                gid=f"val:{d}")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    fig.suptitle("Validation loss per dataset")
    return fig


def weights_figure(records: list[StepRecord], plan):
    """Blend weight per dataset against tokens trained (fixed phases flat, online phases as mixing moved them);
    None when no step was drawn with online mixing."""
    from matplotlib.figure import Figure

    if not any(r.blend_weights is not None for r in records):
        return None
    weights = step_weights(records, plan)
    starts = [r.tokens - plan.tokens_per_step for r in records]
    fig = Figure(figsize=(8, 4))
    (ax,) = _axes(fig, phase_spans(plan))
    for i, d in enumerate(sorted({d for w in weights for d in w})):
        ys = [w.get(d, 0.0) for w in weights]
        ax.step([*starts, records[-1].tokens], [*ys, ys[-1]], where="post", color=f"C{i}", linewidth=1.2, label=d,
                gid=f"weight:{d}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("blend weight")
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Blend weights per dataset (online mixing)")
    return fig


def per_dataset_figure(records: list[StepRecord], plan, values, title: str, ylabel: str, marker=None):
    """One line per dataset of `values(record)` ({dataset: value} or None) against tokens; None without data."""
    from matplotlib.figure import Figure

    points = [(r.tokens, values(r)) for r in records if values(r)]
    if not points:
        return None
    fig = Figure(figsize=(8, 4))
    (ax,) = _axes(fig, phase_spans(plan))
    for d in sorted({d for _, v in points for d in v}):
        ax.plot(*zip(*[(t, v[d]) for t, v in points if d in v]), linewidth=0.8, marker=marker, label=d, gid=d)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write blend.png, loss.png, loss_per_dataset.png, (when evaluated) val_loss.png, val_bpb.png and (with online
    mixing) blend_weights.png; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    plan = plan_for(load_config(run_dir / "config.resolved.yaml"))
    figures = {"blend.png": blend_figure(records, plan) if any(r.consumed_tokens for r in records) else None,
               "blend_weights.png": weights_figure(records, plan),
               "loss.png": loss_figure(records, plan), "val_loss.png": val_loss_figure(records, plan),
               "loss_per_dataset.png": per_dataset_figure(records, plan, lambda r: r.loss_per_dataset,
                                                          "Training loss per dataset", "loss (nats/token)"),
               "val_bpb.png": per_dataset_figure(records, plan, lambda r: r.eval and r.eval.bpb_per_dataset,
                                                 "Validation bits per byte per dataset", "bits per byte", "o")}
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.tight_layout()
            fig.savefig(run_dir / name, dpi=110)
            written.append(run_dir / name)
    return written
