"""`megacrystal bench`: sweep parallel layouts, measure, and write a report with plots."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from ..config.arguments import add_config_args, fraction, nonnegative_int, positive_float, positive_int


def register(subparsers) -> None:

    bench = subparsers.add_parser("bench", help="sweep parallel layouts and report tokens/s, TFLOP/s, MFU, scaling")
    add_config_args(bench)
    bench.add_argument("--sweep", help="measure these points, e.g. 'dp=1,2;tp=1,2;pp=1,2;mbs=1,4'")
    bench.add_argument("--steps", type=positive_int, default=20, help="steps per point (default 20)")
    bench.add_argument("--warmup", type=nonnegative_int, default=5, help="first steps not timed (default 5)")
    bench.add_argument("--repeat", type=positive_int, default=1, metavar="N",
                       help="run the sweep N times, every point once per round, and pool each point's timed steps; "
                            "a host whose speed drifts then moves all points alike (default 1)")
    bench.add_argument("--host-ceiling", action="store_true",
                       help="also run W copies of the 1-process point at once (1/W of the batch each, no "
                            "communication) for every W-rank point: the speed this host gives W processes, against "
                            "which the report shows each point's parallel efficiency")
    bench.add_argument("--out", help="report directory (with --sweep); with --plan, the file the chosen layout's "
                       "--set overrides are written to")
    bench.add_argument("--data", choices=("synthetic", "config"), default="synthetic",
                       help="what the points train on: the synthetic stream (default; no files, no phases) or the "
                            "config's own indexed datasets (one phase with the blend and FIM rate of its widest "
                            "phase; run `megacrystal prepare` first) to measure data loading")
    bench.add_argument("--no-baseline", action="store_true",
                       help="skip the plain-PyTorch eager baseline measured beside the 1-process points")
    model = bench.add_argument_group(
        "throughput model (--predict, --plan, --calibrate): step time and memory of layouts on a described cluster")
    model.add_argument("--predict", action="store_true", help="print the predicted step of the config's layout")
    model.add_argument("--plan", action="store_true",
                       help="rank every valid layout (tp, pp, vpp, dp, micro-batch, recompute, optimizer sharding) by "
                            "predicted tokens/s among those that fit in memory; with --out, write the best as --set "
                            "overrides for `megacrystal launch slurm`")
    model.add_argument("--calibrate", metavar="RUN_DIR", action="append", default=[],
                       help="fit the model's free constants to a measured sweep (its report.json; repeatable) and "
                            "write them to --calibration")
    model.add_argument("--calibration", metavar="FILE",
                       help="constants file: written by --calibrate, read by --predict and --plan")
    model.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    model.add_argument("--devices-per-node", type=positive_int, default=8, help="GPUs per node (default 8)")
    model.add_argument("--device", default="H100 SXM", help="a name from the dense-peak table (default H100 SXM)")
    model.add_argument("--intra-node-gbps-per-gpu", metavar="GBPS", type=positive_float,
                       help="NVLink bandwidth of one GPU to the others of its node, each direction, Gb/s (default: "
                            "the device's, e.g. 3600 for H100 SXM)")
    network = model.add_mutually_exclusive_group()
    network.add_argument("--inter-node-gbps-per-gpu", metavar="GBPS", type=positive_float,
                         help="network bandwidth per GPU between nodes, Gb/s (default: the device's usual NIC, "
                              "400 for H100: one NDR NIC per GPU)")
    network.add_argument("--inter-node-gbps-per-node", metavar="GBPS", type=positive_float,
                         help="network bandwidth of a whole node, Gb/s, shared by its GPUs (e.g. 3200 for 8 x 400)")
    # deprecated names: --inter-node-gbps was per node, --intra-node-gbps per GPU
    network.add_argument("--inter-node-gbps", metavar="GBPS", type=positive_float, help=argparse.SUPPRESS)
    model.add_argument("--intra-node-gbps", metavar="GBPS", type=positive_float, help=argparse.SUPPRESS)
    model.add_argument("--efficiency", metavar="FRACTION", type=fraction,
                       help="sustained fraction of peak of large GEMMs (overrides the constants' gemm_max)")
    model.add_argument("--recompute", default="none",
                       help="activation recomputation the plan may use: none, selective, full, comma-separated "
                            "(default none: megacrystal's config has no recomputation setting yet)")
    model.add_argument("--top", type=positive_int, default=5, help="layouts --plan prints (default 5)")
    link = bench.add_argument_group("link (--link-rates): the model against two namespace hosts, needs root")
    link.add_argument("--link-rates", metavar="MBITS", help="throttle a veth between two network namespaces to "
                      "these rates (tc tbf, Mbit/s each way, e.g. 20,50,200) and compare DP=2 step times with "
                      "the model; writes network.json and a report section to --out")
    slurm = bench.add_argument_group("SLURM (--slurm): every point one job, as `megacrystal launch slurm` renders it")
    slurm.add_argument("--slurm", action="store_true", help="run the points as SLURM jobs (the sweep may have nodes)")
    slurm.add_argument("--gpus-per-node", type=nonnegative_int, help="trainer processes per node; 0 for CPU nodes "
                       "(then --cpus-per-node); MFU on GPUs uses --device")
    slurm.add_argument("--cpus-per-node", type=positive_int,
                       help="CPUs per node; with --gpus-per-node 0 also the processes")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--account", help="account to charge")
    slurm.add_argument("--time", help="time limit per job, e.g. 30 (minutes)")
    slurm.add_argument("--sbatch", dest="sbatch_extra", action="append", default=[], metavar="OPTION",
                       help="one more #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    bench.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from ..config import ConfigError, load_config
    from ..model.size import flops_per_token
    from . import ceiling, peaks, report, sweep

    config = load_config(args.config, args.overrides)
    if args.predict or args.plan or args.calibrate:
        from . import model_commands

        return model_commands.run(args, config)
    if args.link_rates:
        from . import network

        return network.run(args, config)
    if not args.sweep or not args.out:
        raise ConfigError("bench: give --sweep and --out to measure, or --predict to model a cluster")
    if args.steps <= args.warmup + 2:
        raise ConfigError(f"--steps {args.steps} must exceed --warmup {args.warmup} by at least 3")
    if args.repeat > 1 and args.slurm:
        raise ConfigError(f"--repeat {args.repeat}: --slurm jobs run one round (give --repeat 1)")
    from . import slurm

    points = sweep.plan_points(sweep.parse_sweep(args.sweep), slurm.procs_per_node(args))
    global_batch = config.train.global_batch_size
    ceiling_sizes = ceiling.world_sizes(points, global_batch, config.train.micro_batch_size, args.slurm) \
        if args.host_ceiling else []
    lr = sweep.BenchLR.of(config)
    phase = sweep.data_phase(config, args.steps, lr) if args.data == "config" else None
    out = Path(args.out)
    cpu_peaks: dict[int, float] = {}

    def peak_for(point: dict) -> float | None:
        precision = point["settings"].get("precision", config.train.precision)
        if args.slurm and args.gpus_per_node:  # the nodes' GPUs (--device): this host may have none
            return peaks.device_peak_tflops(args.device, precision)
        if torch.cuda.is_available():
            return peaks.device_peak_tflops(torch.cuda.get_device_name(), precision)
        per_host = point["world_size"] // point["settings"].get("nodes", 1)  # ranks sharing one host's cores
        threads = point["settings"].get("threads") or sweep.threads_per_rank(per_host)
        key = (threads, precision)
        if key not in cpu_peaks:
            cpu_peaks[key] = peaks.measure_cpu_peak_tflops(precision, threads)
        return cpu_peaks[key]

    jobs = slurm.plan_jobs(args, points, lr, out, phase) if args.slurm else []  # all checked before any is submitted
    if jobs:
        slurm.run_jobs(jobs, report.command_line())
    overrides = sum((["--set", o] for o in args.overrides), [])
    run_dirs: dict[str, list[Path]] = {point.name: [] for point in points}
    ceiling_dirs: dict[int, list[list[Path]]] = {size: [[] for _ in range(size)] for size in ceiling_sizes}
    baselines = {}
    for round_index in range(1, args.repeat + 1):
        round_name = f"round{round_index}" if args.repeat > 1 else ""
        for i, point in enumerate(points, 1):
            print(f"[{i}/{len(points)}{f', round {round_index}/{args.repeat}' if round_name else ''}] "
                  f"{point.name}: {point.world_size} rank(s), {args.steps} steps", flush=True)
            run_dir = jobs[i - 1].run_dir if jobs else sweep.run_point(
                args.config, overrides, point, args.steps, lr, out, phase, round_name)
            run_dirs[point.name].append(run_dir)
            this_run = sweep.measure([run_dir], args.warmup)
            print(f"    {this_run['tokens_per_s']:,.0f} tokens/s, step {this_run['step_time_s']:.3f} s", flush=True)
            # The baseline runs on this host (so never beside points that ran on a cluster's nodes), right after
            # the first point it compares with: a CPU's speed drifts over minutes, the comparison should not.
            if not (args.no_baseline or jobs) and point.world_size == 1:
                _measure_baseline(config, point.settings, args, baselines)
        for size in ceiling_sizes:
            print(f"host ceiling: {size} copies of {ceiling.base_point(points).name} at once, {args.steps} steps",
                  flush=True)
            dirs = ceiling.run_copies(args.config, overrides, points, size, global_batch, args.steps, lr, out,
                                      phase, round_name)
            for copy_dirs, run_dir in zip(ceiling_dirs[size], dirs):
                copy_dirs.append(run_dir)
    measured = []
    for point in points:
        point.measured = sweep.measure(run_dirs[point.name], args.warmup)
        measured.append(sweep.as_dict(point))
    rows = report.summarize(measured, flops_per_token(config.model), peak_for)
    ceilings = {size: ceiling.measure(dirs, args.warmup) for size, dirs in ceiling_dirs.items()}
    ceiling.summarize(rows, ceilings)
    for row in rows:
        key = _baseline_key(config, row["settings"])
        if row["world_size"] == 1 and key in baselines:
            row["baseline"] = key
            row["step_time_vs_baseline"] = row["measured"]["step_time_s"] / baselines[key]["step_time_s"]
    env = report.environment({f"{t} threads {p}": v for (t, p), v in cpu_peaks.items()} or "device table")
    meta = {"config": args.config, "sweep": args.sweep, "steps": args.steps, "warmup": args.warmup,
            "repeat": args.repeat, "lr": asdict(lr),
            "data": {"bench": phase, "train_tokens_sha256": sweep.train_tokens_sha256(config, phase)}
            if phase else "synthetic",
            "flops_per_token": flops_per_token(config.model), "command": report.command_line()}
    if jobs:
        meta["slurm"] = slurm.meta(args, jobs)
        env["network"] = "SLURM: ranks on different nodes talk over the cluster's network"
    for path in report.write_report(out, rows, env, {**meta, "baselines": baselines, "host_ceiling": ceilings}):
        print(path)
    return 0


def _baseline_setting(config, settings: dict) -> tuple[int, str]:
    """The (micro-batch, precision) a point's baseline runs at, and so its key in the report."""
    return settings.get("mbs", config.train.micro_batch_size), settings.get("precision", config.train.precision)


def _baseline_key(config, settings: dict) -> str:
    mbs, precision = _baseline_setting(config, settings)
    return f"mbs{mbs}_{precision}"


def _measure_baseline(config, settings: dict, args, baselines: dict) -> None:
    """Time the plain-PyTorch baseline at this point's (micro-batch, precision) unless it already ran."""
    from .baseline import time_baseline

    key = _baseline_key(config, settings)
    if key in baselines:
        return
    mbs, precision = _baseline_setting(config, settings)
    print(f"baseline (plain PyTorch eager): micro-batch {mbs}, {precision}", flush=True)
    baselines[key] = time_baseline(config.model, mbs, config.train.global_batch_size // mbs, args.steps,
                                   args.warmup, precision, threads=os.cpu_count())
