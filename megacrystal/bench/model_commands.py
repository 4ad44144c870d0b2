"""`megacrystal bench --predict | --plan | --calibrate`: the throughput model (bench/perf/) on the command line."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..config import Config, ConfigError


def _number(args, flag: str, kind=float, default=None):
    """A flag's value (the config.arguments types have already refused 0, negatives and non-numbers), or `default`."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    return default if value is None else kind(value)


def cluster_of(args, precision: str):
    """The described cluster; per-node and deprecated link flags turned into per-GPU bandwidth."""
    from .perf.hardware import Cluster, device

    dev = device(args.device, precision)
    nodes = _number(args, "--nodes", int)
    per_node = _number(args, "--devices-per-node", int)
    intra = _number(args, "--intra-node-gbps-per-gpu")
    if args.intra_node_gbps is not None:
        print("megacrystal: --intra-node-gbps is deprecated; it means --intra-node-gbps-per-gpu", file=sys.stderr)
        intra = _number(args, "--intra-node-gbps")
    inter = _number(args, "--inter-node-gbps-per-gpu")
    node_network = _number(args, "--inter-node-gbps-per-node")
    if args.inter_node_gbps is not None:
        print("megacrystal: --inter-node-gbps is deprecated (it was per node); use --inter-node-gbps-per-node or "
              "--inter-node-gbps-per-gpu", file=sys.stderr)
        node_network = _number(args, "--inter-node-gbps")
    if node_network is not None:
        inter = node_network / per_node
    return Cluster(dev, nodes, per_node, intra / 8 if intra else dev.nvlink_gbytes_s, inter or dev.nic_gbits_s)


def constants_of(args):
    """Constants from --calibration (or the device's defaults), with --efficiency over gemm_max."""
    from .perf.hardware import default_constants, load_constants

    c = load_constants(args.calibration) if args.calibration else default_constants(args.device)
    efficiency = _number(args, "--efficiency")
    if efficiency is not None:
        if efficiency > 1:
            raise ConfigError(f"--efficiency {efficiency}: a fraction of peak, at most 1")
        c = c.with_(gemm_max=efficiency)
    return c


def layout_of(config: Config, dp: int):
    """The config's own layout (what `--predict` models)."""
    from .perf.shapes import Layout

    p, t = config.parallel, config.train
    return Layout(tp=p.tp, pp=p.pp, dp=dp, micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                  vpp=p.vpp, sp=p.sp, recompute="none", distributed_optimizer=p.distributed_optimizer,
                  zero_stage=config.deepspeed.zero_stage if config.engine == "deepspeed" else 0,
                  overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=False, tp_comm_overlap=False)


def run(args, config: Config) -> int:
    """Dispatch to calibrate, plan or predict."""
    if args.calibrate:
        return _calibrate(args)
    from .perf.shapes import Shape

    precision = config.train.precision
    cluster = cluster_of(args, precision)
    c = constants_of(args)
    shape = Shape.of(config.model, precision)
    print(f"cluster      {cluster.nodes} nodes x {cluster.devices_per_node} {cluster.device.name} "
          f"({cluster.device.peak_tflops:g} TFLOP/s dense {precision}, {cluster.device.memory_gb:g} GB), "
          f"{cluster.inter_gbits_s_per_device:g} Gb/s per GPU between nodes, {8 * cluster.intra_gbytes_s:g} Gb/s "
          f"per GPU inside; constants: {c.source}")
    if args.plan:
        return _plan(args, config, shape, cluster, c)
    from .perf.plan import breakdown_lines
    from .perf.step import estimate

    layout = layout_of(config, config.data_parallel_size(cluster.devices))
    est = estimate(shape, layout, cluster, c)
    print(f"layout       {layout.describe()}")
    print("\n".join(breakdown_lines(est)))
    return 0


def _plan(args, config: Config, shape, cluster, c) -> int:
    from .perf.plan import breakdown_lines, overrides, table
    from .perf.search import Options, candidates, rank
    from .perf.shapes import RECOMPUTE

    recompute = tuple(r.strip() for r in args.recompute.split(","))
    if not recompute or any(r not in RECOMPUTE for r in recompute):
        raise ConfigError(f"--recompute {args.recompute!r}: give some of {', '.join(RECOMPUTE)}, comma-separated")
    top = _number(args, "--top", int)
    base = layout_of(config, 1).with_(overlap_grad_reduce=config.parallel.overlap_grad_reduce)
    options = Options(recompute=recompute, sharding=("distributed_optimizer", "none", "zero1", "zero2", "zero3"))
    ranked = rank(shape, cluster, candidates(shape, cluster, config.train.global_batch_size, options, base), c)
    fitting = [le for le in ranked if le[1].memory.fits]
    print(f"plan         {len(ranked)} valid layouts, {len(fitting)} fit in memory; fastest first:")
    if not fitting:
        raise ConfigError(f"--plan: none of {len(ranked)} layouts of {config.model.num_layers} layers fits in "
                          f"{cluster.device.memory_gb:g} GB; add nodes, or allow --recompute selective,full")
    print("\n".join(table(ranked, top)))
    best, est = fitting[0]
    print(f"best         {best.describe()}")
    print("\n".join(breakdown_lines(est)))
    sets = overrides(best)
    if best.recompute != "none":
        print(f"note         recompute {best.recompute}: not a megacrystal config setting yet (no --set for it)")
    command = (f"megacrystal launch slurm --config {args.config} --nodes {cluster.nodes} --gpus-per-node "
               f"{cluster.devices_per_node} " + " ".join(f"--set {s}" for s in list(args.overrides) + sets))
    print(f"launch       {command} --submit")
    if args.out:
        _write_atomic(Path(args.out), "".join(f"--set {s}\n" for s in sets))
        print(Path(args.out))
    return 0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _calibrate(args) -> int:
    from .perf.calibrate import calibrate

    if not args.calibration:
        raise ConfigError("--calibrate: give --calibration FILE to write the fitted constants to")
    result = calibrate([Path(d) for d in args.calibrate], Path(args.calibration))
    for line in result["lines"]:
        print(line)
    print(args.calibration)
    return 0
