"""The throughput model against published Megatron-LM runs (published.py): each row's prediction and error.

A row pins what its source published (model, tp/pp/dp, batch, GPU, recomputation where stated) and lets the
model choose what it did not publish (`search`: micro-batch, interleaving, recomputation) as the layout search
would, among layouts that fit in memory. Rows report TFLOP/s per GPU the way their source counts them.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .hardware import Cluster, Constants, default_constants, device
from .search import Options, candidates, rank
from .shapes import Layout, Shape

def published_rows() -> list[dict]:
    """The rows of published.py."""
    from .published import ROWS

    return ROWS


def hardware_flops_with_recompute(shape: Shape, batch: int) -> float:
    """FLOPs of one step as Narayanan et al. 2021 count them (their eq. 3, full recomputation included):
    96 B s l h^2 (1 + s / 6h + V / 16 l h)."""
    s, l, h, v = shape.seq, shape.layers, shape.hidden, shape.vocab
    return 96 * batch * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


def predict_row(row: dict, c: Constants | None = None) -> dict:
    """The model's best layout for a published row, its predicted TFLOP/s per GPU and the error."""
    c = c or default_constants(row["gpu"])
    shape = Shape(**row["shape"])
    dev = device(row["gpu"])
    cluster = Cluster(dev, row["gpus"] // 8 or 1, min(8, row["gpus"]), dev.nvlink_gbytes_s, dev.nic_gbits_s)
    given = dict(row["layout"])
    batch = given.pop("global_batch")
    base = Layout(tp=1, pp=1, dp=1, micro_batch=1, global_batch=batch, **{
        k: v for k, v in given.items() if k not in ("tp", "pp", "dp", "micro_batch", "recompute", "sp",
                                                   "distributed_optimizer")})
    free = set(row["search"])
    fixed = {k: v for k, v in given.items() if k in ("tp", "pp", "dp", "micro_batch", "recompute", "sp",
                                                      "distributed_optimizer") and k not in free}
    if "vpp" not in free:
        fixed.setdefault("vpp", None)
    ranked = rank(shape, cluster, candidates(shape, cluster, batch, Options(fixed=tuple(fixed.items())), base), c)
    if not ranked:
        raise ValueError(f"{row['id']}: no valid layout")
    layout, est = ranked[0]
    if row["metric"] == "tflops_per_gpu_with_recompute":
        predicted = hardware_flops_with_recompute(shape, batch) / est.step_s / row["gpus"] / 1e12
    else:
        predicted = est.tflops_per_device
    return {"id": row["id"], "predicted": round(predicted, 1), "published": row["published"],
            "error": round(predicted / row["published"] - 1, 4), "fits": est.memory.fits,
            "layout": layout.describe(), "step_s": round(est.step_s, 3),
            "breakdown": {k: round(v, 3) for k, v in est.breakdown().items() if k.endswith("_s")}}


def validate(c: Constants | None = None) -> dict:
    """Every row predicted, with the median and largest absolute error."""
    results = [predict_row(row, c) for row in published_rows()]
    errors = [abs(r["error"]) for r in results]
    return {"rows": results, "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}


def markdown(result: dict) -> str:
    """The validation table as markdown: one row per published run, with its source, layout and error."""
    rows = {r["id"]: r for r in published_rows()}
    lines = ["| run | model | published layout | GPUs | GPU, network | batch | published TFLOP/s/GPU | predicted | "
             "error | model's choice of the unpublished settings |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        row = rows[r["id"]]
        lay = row["layout"]
        given = f"tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}" + (
            f", mbs {lay['micro_batch']}" if "micro_batch" in lay else "") + (
            f", recompute {lay['recompute']}" if "recompute" in lay else "")
        metric = " (recompute counted)" if row["metric"] == "tflops_per_gpu_with_recompute" else ""
        lines.append(f"| {r['id']} | {row['model']} | {given} | {row['gpus']} | {row['gpu']}; {row['network']} | "
                     f"{lay['global_batch']} | {row['published']}{metric} | {r['predicted']} | "
                     f"{100 * r['error']:+.1f}% | {r['layout']} |")
    lines.append("")
    lines.append(f"Median absolute error {100 * result['median_abs_error']:.1f}%, largest "
                 f"{100 * result['max_abs_error']:.1f}%, {len(result['rows'])} rows.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m megacrystal.bench.perf.validation OUT.json: the table's machine-readable form
    import sys

    out = validate()
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
