"""The flags of `megacrystal prepare` beyond --config/--set, and running it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config.arguments import nonnegative_int, positive_int


def add_prepare_args(parser: argparse.ArgumentParser) -> None:
    """--workers, --shard-index/--num-shards, --force and --slurm-array."""
    parser.add_argument("--workers", type=positive_int, default=None, help="tokenizer threads (default data.workers)")
    parser.add_argument("--shard-index", type=nonnegative_int, default=0,
                        help="this process's part of the shards (0-based)")
    parser.add_argument("--num-shards", type=positive_int, default=1,
                        help="split the shards over this many processes or machines (each takes every n-th)")
    parser.add_argument("--force", action="store_true", help="rebuild shards even if they are complete")
    parser.add_argument("--slurm-array", type=positive_int, default=None, metavar="N",
                        help="write a SLURM array job of N tasks (and a finishing job) instead of preparing")
    parser.add_argument("--slurm-script", default="prepare.sbatch", help="where --slurm-array writes the script")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH line for --slurm-array, e.g. --sbatch=--partition=cpu")


def run_prepare(args: argparse.Namespace, config) -> int:
    """Prepare (this process's shards of) the config's datasets, or render the SLURM array job."""
    from .errors import DataError

    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers {args.workers}: give at least 1")
    if args.num_shards < 1:
        raise DataError(f"--num-shards {args.num_shards}: give at least 1")
    if not 0 <= args.shard_index < args.num_shards:
        raise DataError(f"--shard-index {args.shard_index} must be in [0, --num-shards {args.num_shards})")
    if args.slurm_array is not None:
        from .prepare_slurm import render, submit_hint

        script = render(args.config, args.overrides, args.slurm_array, args.workers or config.data.workers,
                        Path(args.slurm_script), args.sbatch)
        print(f"wrote {script}; run: {submit_hint(script)}")
        return 0
    from .pipeline import prepare

    prepare(config, shard_index=args.shard_index, num_shards=args.num_shards, workers=args.workers,
            force=args.force)
    return 0
