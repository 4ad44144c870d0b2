"""`megacrystal launch slurm ...`: the sbatch script of a run, printed (--dry-run) or submitted (--submit)."""
from __future__ import annotations

import argparse
import shlex

from ..config.arguments import add_config_args, nonnegative_int, positive_int


def register(subparsers) -> None:
    """Add `launch slurm` to the megacrystal command line."""
    from .slurm import CPU_BIND_MODES

    launch = subparsers.add_parser("launch", help="launch a run on a cluster (SLURM)")
    targets = launch.add_subparsers(dest="target", required=True)
    slurm = targets.add_parser(
        "slurm", help="render the sbatch script of a run; print it (--dry-run) or submit it (--submit)",
        description="One torchrun per node through srun, c10d rendezvous on the first node, --resume auto, "
                    "SIGUSR1 before the time limit -> checkpoint -> exit 75 -> scontrol requeue -> resume.")
    add_config_args(slurm)
    slurm.add_argument("--nodes", type=positive_int, required=True, help="number of nodes")
    slurm.add_argument("--gpus-per-node", type=nonnegative_int, required=True,
                       help="GPUs per node = trainer processes per node; 0 for CPU-only nodes")
    slurm.add_argument("--cpus-per-node", type=positive_int, default=None,
                       help="CPUs to request per node (default: whole nodes, --exclusive); with --gpus-per-node 0 "
                            "also the trainer processes per node (default there: every CPU SLURM allocates)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--time", help="time limit, e.g. 2-00:00:00 or 90 (minutes)")
    slurm.add_argument("--account", help="account to charge")
    slurm.add_argument("--signal-before", type=positive_int, default=300, metavar="S",
                       help="seconds before the time limit at which the trainers are told to checkpoint and "
                            "stop, then the job is requeued (default 300)")
    slurm.add_argument("--job-name", help="job name (default: run.name)")
    slurm.add_argument("--log-dir", help="where the job logs go (default: <run.dir>/slurm)")
    slurm.add_argument("--max-requeues", type=nonnegative_int, default=50,
                       help="stop requeueing after this many restarts (default 50)")
    slurm.add_argument("--sbatch", dest="sbatch_extra", action="append", default=[], metavar="OPTION",
                       help="one more #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    slurm.add_argument("--python", default=None, metavar="PATH",
                       help="the python the nodes run (default: this one, i.e. the env setup_env.sh built)")
    slurm.add_argument("--cpu-bind", default=None, metavar="MODE",
                       help="GPU nodes: bind each trainer to CPUs near its GPU (torchrun --numa-binding; needs "
                            f"numactl on the nodes): {', '.join(CPU_BIND_MODES)} (default node)")
    slurm.add_argument("--nccl-socket-ifname", metavar="IFACES",
                       help="GPU nodes: NCCL_SOCKET_IFNAME for the trainers, e.g. ib0 or ^lo,docker (default: "
                            "NCCL picks)")
    slurm.add_argument("--nccl-ib-hca", metavar="HCAS",
                       help="GPU nodes: NCCL_IB_HCA, e.g. mlx5_0,mlx5_1 (default: NCCL picks)")
    slurm.add_argument("--no-check", action="store_true",
                       help="skip the checks on this host (data, tokenizer and run paths exist or can be created; "
                            "the job's torch has CUDA when GPUs are asked for): for files only the nodes see")
    mode = slurm.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print the script")
    mode.add_argument("--submit", action="store_true", help="sbatch the script and print the job id")
    slurm.set_defaults(handler=run_slurm)


def _command_line(args: argparse.Namespace) -> str:
    """The command that renders this script, for its header."""
    words = ["megacrystal", "launch", "slurm", "--config", args.config, "--nodes", str(args.nodes),
             "--gpus-per-node", str(args.gpus_per_node)]
    for flag in ("cpus_per_node", "partition", "time", "account", "signal_before", "job_name", "log_dir",
                 "max_requeues", "python", "cpu_bind", "nccl_socket_ifname", "nccl_ib_hca"):
        value = getattr(args, flag)
        if value is not None:
            words += [f"--{flag.replace('_', '-')}", str(value)]
    words += [f"--sbatch={extra}" for extra in args.sbatch_extra]
    words += ["--no-check"] if args.no_check else []
    for item in args.overrides:
        words += ["--set", item]
    words.append("--submit" if args.submit else "--dry-run")
    return " ".join(shlex.quote(word) for word in words)


def run_slurm(args: argparse.Namespace) -> int:
    """Handler of `megacrystal launch slurm`."""
    from .slurm import SlurmJob, render, resolve, submit

    job = resolve(SlurmJob(
        config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, overrides=list(args.overrides),
        cpus_per_node=args.cpus_per_node, partition=args.partition, time=args.time, account=args.account,
        signal_before=args.signal_before, job_name=args.job_name, log_dir=args.log_dir,
        max_requeues=args.max_requeues, sbatch_extra=list(args.sbatch_extra), cpu_bind=args.cpu_bind,
        nccl_socket_ifname=args.nccl_socket_ifname, nccl_ib_hca=args.nccl_ib_hca, check=not args.no_check,
        **({"python": args.python} if args.python else {})))
    script = render(job, _command_line(args))
    if args.dry_run:
        print(script, end="")
    else:
        print(submit(job, script))
    return 0
