"""`bench --calibrate RUN_DIR`: fit the model's free constants to a measured sweep (its report.json).

Each measured point becomes a prediction problem: its config and layout, a device whose peak is the one the
bench measured for that point (on a CPU: the matmul rate at its threads per rank, shared when ranks outnumber
cores), and the measured step time. The constants in `hardware.FITTED` plus the attention efficiency are
fitted by minimising the squared log error over all points (coordinate search in log space: a handful of
constants and tens of points), so the prediction for the user's own machine improves with one measured sweep.
"""
from __future__ import annotations

import json
import math
import shlex
import statistics
from dataclasses import replace
from pathlib import Path

from ...config import ConfigError, load_config
from .hardware import Cluster, Constants, Device, save_constants
from .shapes import Layout, Shape
from .step import estimate

FIT = ("gemm_max", "attention_efficiency", "hbm_efficiency", "intra_link_efficiency", "step_overhead_s")
BOUNDS = {"gemm_max": (0.01, 1.0), "attention_efficiency": (0.005, 1.0), "hbm_efficiency": (0.001, 10.0),
          "intra_link_efficiency": (1e-4, 100.0), "step_overhead_s": (1e-4, 10.0)}
# Nominal figures for a CPU "device": the fitted efficiencies scale them, so only their product matters.
CPU_MEMORY_GBYTES_S, CPU_LINK_GBYTES_S = 10.0, 1.0


def load_points(run_dir: Path) -> list[dict]:
    """The measured points of one sweep, each with what the model needs to predict it."""
    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text())
        points, config_path = report["points"], report["config"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--calibrate {run_dir}: no readable report.json of `megacrystal bench` ({err})")
    words = shlex.split(report.get("command", ""))
    overrides = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]
    cores = report.get("environment", {}).get("cores") or 1
    config = load_config(_find(config_path, run_dir), overrides)
    out = []
    for point in points:
        peak = point.get("peak_tflops_per_device")
        if not peak:
            continue
        settings, measured = point["settings"], point["measured"]
        out.append({"run": run_dir.name, "name": point["name"], "config": config, "settings": settings,
                    "world_size": point["world_size"], "peak_tflops": peak, "cores": cores,
                    "tokens_per_step": measured["tokens_per_step"], "measured_s": measured["step_time_s"]})
    return out


def _find(config_path: str, run_dir: Path) -> Path:
    for base in (Path.cwd(), *run_dir.resolve().parents):
        if (base / config_path).exists():
            return base / config_path
    raise ConfigError(f"--calibrate {run_dir}: its config {config_path} is not found from here")


def problem(point: dict) -> tuple[Shape, Layout, Cluster]:
    """The model's inputs for one measured point."""
    config, s = point["config"], point["settings"]
    precision = s.get("precision", config.train.precision)
    shape = replace(Shape.of(config.model, precision), flash_attention=True)
    tp, pp, dp = s.get("tp", config.parallel.tp), s.get("pp", config.parallel.pp), s.get("dp", 1)
    mbs = s.get("mbs", config.train.micro_batch_size)
    batch = point["tokens_per_step"] // config.model.seq_length
    layout = Layout(tp=tp, pp=pp, dp=dp, micro_batch=mbs, global_batch=batch,
                    vpp=s.get("vpp", config.parallel.vpp), sp=s.get("sp", config.parallel.sp) and tp > 1,
                    distributed_optimizer=config.parallel.distributed_optimizer, overlap_grad_reduce=False,
                    overlap_param_gather=False)
    # ranks beyond the cores share them: each gets cores / ranks of the one-thread rate the bench measured
    share = min(1.0, point["cores"] / point["world_size"]) if point["world_size"] > point["cores"] else 1.0
    dev = Device("CPU", point["peak_tflops"] * share, 1e6, CPU_MEMORY_GBYTES_S * share, CPU_LINK_GBYTES_S, 1.0)
    return shape, layout, Cluster(dev, 1, point["world_size"], CPU_LINK_GBYTES_S, 1.0)


def errors(points: list[dict], c: Constants) -> list[float]:
    """predicted / measured - 1 for every point."""
    return [estimate(*problem(p), c).step_s / p["measured_s"] - 1 for p in points]


def _loss(points: list[dict], c: Constants) -> float:
    return sum(math.log1p(e) ** 2 for e in errors(points, c))


def fit(points: list[dict], start: Constants | None = None, rounds: int = 40) -> Constants:
    """Constants minimising the squared log error of the points' step times."""
    c = (start or Constants()).with_(step_overhead_s=0.01, collective_latency_s=1e-4)
    best = _loss(points, c)
    step = 2.0
    for _ in range(rounds):
        improved = False
        for name in FIT:
            for factor in (step, 1 / step):
                lo, hi = BOUNDS[name]
                trial = c.with_(**{name: min(hi, max(lo, getattr(c, name) * factor))})
                loss = _loss(points, trial)
                if loss < best - 1e-12:
                    c, best, improved = trial, loss, True
        if not improved:
            step = math.sqrt(step)
            if step < 1.001:
                break
    return c


def calibrate(run_dirs: list[Path], out: Path) -> dict:
    """Fit the constants to the sweeps in `run_dirs`, write them to `out`, and report every point's error."""
    points = [p for d in run_dirs for p in load_points(d)]
    if len(points) < 3:
        raise ConfigError(f"--calibrate: {len(points)} measured points with a peak; a fit needs at least 3")
    before = errors(points, Constants())
    c = fit(points).with_(source=f"calibrated on {', '.join(str(d) for d in run_dirs)}")
    after = errors(points, c)
    rows = [{"run": p["run"], "point": p["name"], "world_size": p["world_size"], "measured_s": p["measured_s"],
             "predicted_s": p["measured_s"] * (1 + e), "error": e} for p, e in zip(points, after)]
    median = statistics.median(abs(e) for e in after)
    save_constants(out, c, {"points": rows, "median_abs_error": median,
                            "median_abs_error_uncalibrated": statistics.median(abs(e) for e in before)})
    lines = [f"{'run':18s} {'point':28s} {'ranks':>5} {'measured s':>10} {'predicted s':>11} {'error':>7}"]
    lines += [f"{r['run']:18s} {r['point']:28s} {r['world_size']:>5} {r['measured_s']:10.3f} "
              f"{r['predicted_s']:11.3f} {100 * r['error']:+6.1f}%" for r in rows]
    lines.append(f"median |error| {100 * median:.1f}% after calibration "
                 f"({100 * statistics.median(abs(e) for e in before):.1f}% with the default constants)")
    lines.append("constants " + ", ".join(f"{k}={getattr(c, k):.4g}" for k in FIT))
    return {"constants": c, "rows": rows, "median_abs_error": median, "lines": lines}
