"""`megacrystal ablate`: train a grid of variants (or render its SLURM jobs), then report and fit a mixture."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError
from ..config.arguments import nonnegative_int, positive_int


def register(subparsers) -> None:
    """Add the `ablate` subcommand."""
    p = subparsers.add_parser("ablate", help="train every variant of an ablation grid and report per-domain BPB")
    p.add_argument("--grid", required=True, help="grid YAML, e.g. configs/lab/code-fraction-grid.yaml")
    p.add_argument("--config", default=None, help="base config (default: the grid's `base:`)")
    p.add_argument("--out", required=True, help="directory of the variants' runs and the report")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every variant, e.g. --set train.threads=2")
    p.add_argument("--report-only", action="store_true", help="do not train; report the finished variants")
    p.add_argument("--fit-target", default=None, metavar="DOMAIN[=W],...",
                   help="the fitted mixture's target: a weighted sum of domains' BPB (default: all, equally)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    s = p.add_argument_group("SLURM (render one job per variant and an array job instead of training here)")
    s.add_argument("--slurm", action="store_true", help="write <out>/slurm/variant-*.sbatch and array.sbatch")
    s.add_argument("--submit", action="store_true", help="with --slurm: sbatch the array job")
    s.add_argument("--nodes", type=positive_int, default=1)
    s.add_argument("--gpus-per-node", type=nonnegative_int, default=0)
    s.add_argument("--cpus-per-node", type=positive_int, default=None)
    s.add_argument("--partition")
    s.add_argument("--time")
    s.add_argument("--account")
    s.add_argument("--no-check", action="store_true",
                   help="skip the checks on this host (paths, torch) when only the nodes see them")
    p.set_defaults(handler=_ablate)
    from .average import register as register_average

    register_average(subparsers)


def _ablate(args) -> int:
    from .fit import fit_mixture, parse_target
    from .grid import load_grid
    from .report import collect, write_report
    from .runner import run_grid

    out = Path(args.out)
    grid = load_grid(args.grid, args.config, list(args.overrides))
    if args.submit and not args.slurm:
        raise ConfigError("--submit: only with --slurm")
    if args.slurm:
        from ..launch.slurm import SlurmJob
        from .slurm import render_grid, write_scripts

        template = SlurmJob(config=str(grid.base), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                            cpus_per_node=args.cpus_per_node, partition=args.partition, time=args.time,
                            account=args.account, python=sys.executable, check=not args.no_check)
        command = "megacrystal " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        directory = write_scripts(render_grid(grid, out, template, command), out)
        print(f"wrote {len(grid.variants)} variant scripts and {directory / 'array.sbatch'}")
        if args.submit:
            (out / "slurm").mkdir(parents=True, exist_ok=True)
            done = subprocess.run(["sbatch", "--parsable", str(directory / "array.sbatch")], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise ConfigError(f"--submit: sbatch failed: {done.stderr.strip() or done.stdout.strip()}")
            print(f"submitted array job {done.stdout.strip()}; rerun with --report-only when it is done")
        return 0
    if not args.report_only:
        run_grid(grid, out)
    fit = None
    results = collect(grid, out)
    if len([r for r in results.values() if r["phases"]]) >= 3:
        fit = fit_mixture(results, parse_target(args.fit_target))
    for path in write_report(grid, out, fit):
        print(path)
    return 0
