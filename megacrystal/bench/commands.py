"""`megacrystal bench`: sweep parallel layouts, measure, and write a report with plots."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    from ..cli import add_config_args

    bench = subparsers.add_parser("bench", help="sweep parallel layouts and report tokens/s, TFLOP/s, MFU, scaling")
    add_config_args(bench)
    bench.add_argument("--sweep", required=True, help="e.g. 'dp=1,2;tp=1,2;pp=1,2;mbs=1,4'")
    bench.add_argument("--steps", type=int, default=20, help="steps per point (default 20)")
    bench.add_argument("--warmup", type=int, default=5, help="first steps not timed (default 5)")
    bench.add_argument("--out", required=True, help="report directory")
    bench.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from ..config import ConfigError, load_config
    from ..model.size import flops_per_token
    from . import peaks, report, sweep

    config = load_config(args.config, args.overrides)
    if args.steps <= args.warmup + 2:
        raise ConfigError(f"--steps {args.steps} must exceed --warmup {args.warmup} by at least 3")
    points = sweep.plan_points(sweep.parse_sweep(args.sweep))
    # Points run on the synthetic stream (no data files, no phase boundaries) at the first phase's peak LR.
    lr = config.optim.lr or next(iter(config.data.phases.values())).lr.peak if config.data.phases else config.optim.lr
    out = Path(args.out)
    cpu_peaks: dict[int, float] = {}

    def peak_for(point: dict) -> float | None:
        precision = point["settings"].get("precision", config.train.precision)
        if torch.cuda.is_available():
            return peaks.device_peak_tflops(torch.cuda.get_device_name(), precision)
        threads = point["settings"].get("threads") or max(1, (os.cpu_count() or 1) // point["world_size"])
        key = (threads, precision)
        if key not in cpu_peaks:
            cpu_peaks[key] = peaks.measure_cpu_peak_tflops(precision, threads)
        return cpu_peaks[key]

    measured = []
    for i, point in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {point.name}: {point.world_size} rank(s), {args.steps} steps", flush=True)
        run_dir = sweep.run_point(args.config, sum((["--set", o] for o in args.overrides), []), point,
                                  args.steps, lr, out)
        point.measured = sweep.measure(run_dir, args.warmup)
        print(f"    {point.measured['tokens_per_s']:,.0f} tokens/s, step {point.measured['step_time_s']:.3f} s",
              flush=True)
        measured.append(sweep.as_dict(point))
    rows = report.summarize(measured, flops_per_token(config.model), peak_for)
    env = report.environment({f"{t} threads {p}": v for (t, p), v in cpu_peaks.items()} or "device table")
    meta = {"config": args.config, "sweep": args.sweep, "steps": args.steps, "warmup": args.warmup,
            "flops_per_token": flops_per_token(config.model), "command": " ".join(sys.argv)}
    for path in report.write_report(out, rows, env, meta):
        print(path)
    return 0
