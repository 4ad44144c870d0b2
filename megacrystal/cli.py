"""The `megacrystal` command. Thin: parse arguments, load the config, hand over to a package."""
from __future__ import annotations

import argparse
import os
import sys

from .config import Config, ConfigError, load_config
from .checkpoint.errors import CheckpointError
from .data.errors import DataError
from .host_memory import keep_freed_memory
from .quiet import quiet_expected_warnings


# Packages that own further subcommands: each module has `register(subparsers)`, which adds its parsers with
# `set_defaults(handler=fn)`; `fn(args) -> int` runs the command (errors as ConfigError/DataError/...).
EXTRA_COMMANDS: list[str] = [
    "megacrystal.bench.commands",
    "megacrystal.export.commands",
    "megacrystal.launch.commands",
    "megacrystal.lab.commands",
]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config, --set and --debug, as every config-driven command takes them."""
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/crystal-tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted name, e.g. --set parallel.tp=2")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacrystal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the parameter count and the parallel layout")
    add_config_args(info)
    info.add_argument("--world-size", type=int, default=None,
                      help="processes to lay out (default: $WORLD_SIZE, else tp x pp)")
    train = commands.add_parser("train", help="train (one process, or each rank under torchrun)")
    add_config_args(train)
    train.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                       help="auto: the newest intact checkpoint of checkpoint.dir, if any (default); "
                            "PATH: that checkpoint (or checkpoint root); none: start fresh")
    prepare = commands.add_parser("prepare", help="build the corpus, tokenizer and indexed datasets of a config")
    add_config_args(prepare)
    plot = commands.add_parser("plot", help="write the PNG plots of a run directory")
    plot.add_argument("run_dir")
    plot.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    import importlib

    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(commands)
    return parser


def _info(config: Config, world_size: int | None) -> None:
    from .model.size import flops_per_token, matmul_parameters, parameter_count

    m, p, t = config.model, config.parallel, config.train
    world = world_size or int(os.environ.get("WORLD_SIZE", 0)) or p.tp * p.pp
    dp = config.data_parallel_size(world)
    stages = p.pp * (p.vpp or 1)
    print(f"model        {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads x {m.head_dim}, "
          f"ffn {m.ffn_hidden_size}, vocab {m.vocab_size}, seq {m.seq_length}")
    print(f"parameters   {parameter_count(m):,} (tied embeddings; {matmul_parameters(m):,} in matmuls)")
    print(f"flops/token  {flops_per_token(m) / 1e9:.3f} GFLOP (training, forward + backward)")
    print(f"layout       world {world} = tp {p.tp} x pp {p.pp} x dp {dp}"
          f"{f' (vpp {p.vpp})' if p.vpp else ''}{', sequence parallel' if p.sp else ''}"
          f"{', distributed optimizer' if p.distributed_optimizer else ''}")
    print(f"per stage    {m.num_layers // stages} layers per {'virtual ' if p.vpp else ''}stage")
    print(f"batch        {t.global_batch_size} x {m.seq_length} = {t.global_batch_size * m.seq_length:,} tokens/step; "
          f"{t.global_batch_size // (t.micro_batch_size * dp)} micro-batches of {t.micro_batch_size} per rank")
    from .schedule.from_config import plan_for

    print(plan_for(config).report())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    keep_freed_memory()
    if not args.debug:
        quiet_expected_warnings()
    try:
        if getattr(args, "handler", None):
            return args.handler(args)
        if args.command == "plot":
            from .train.plots import plot_run

            for path in plot_run(args.run_dir):
                print(path)
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "prepare":
            from .data.pipeline import prepare

            prepare(config)
        elif args.command == "info":
            _info(config, args.world_size)
        elif args.command == "train":
            from .train.loop import train
            from .train.signals import EXIT_PREEMPTED, Preempted

            try:
                train(config, resume=args.resume)
            except Preempted as stop:
                if int(os.environ.get("RANK", "0")) == 0:
                    print(f"megacrystal: {stop}", file=sys.stderr)
                return EXIT_PREEMPTED
        return 0
    except (ConfigError, DataError, CheckpointError) as err:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # one line, from one rank
            print(f"megacrystal: error: {err}", file=sys.stderr)
        return 2
