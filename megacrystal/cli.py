"""The `megacrystal` command. Thin: parse arguments, load the config, hand over to a package."""
from __future__ import annotations

import argparse
import os
import sys

from .checkpoint.errors import CheckpointError
from .config.arguments import add_config_args, positive_int
from .config import Config, ConfigError, load_config
from .data.errors import DataError
from .host_memory import bound_retained_memory, keep_freed_memory
from .quiet import quiet_expected_warnings


# Packages that own further subcommands: each module has `register(subparsers)`, which adds its parsers with
# `set_defaults(handler=fn)`; `fn(args) -> int` runs the command (errors as ConfigError/DataError/...).
EXTRA_COMMANDS: list[str] = [
    "megacrystal.bench.commands",
    "megacrystal.bench.prepare_bench",
    "megacrystal.export.commands",
    "megacrystal.launch.commands",
    "megacrystal.lab.commands",
]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line like every other bad input (the usage is one --help away).

    Subparsers inherit the class (argparse's add_subparsers defaults parser_class to the parent's type).
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megacrystal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the parameter count and the parallel layout")
    add_config_args(info)
    info.add_argument("--world-size", type=positive_int, default=None,
                      help="processes to lay out (default: $WORLD_SIZE, else tp x pp)")
    train = commands.add_parser("train", help="train (one process, or each rank under torchrun)")
    add_config_args(train)
    train.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                       help="auto: the newest intact checkpoint of checkpoint.dir, if any (default); "
                            "PATH: that checkpoint (or checkpoint root); none: start fresh")
    train.add_argument("--allow-data-change", action="store_true",
                       help="resume even if the prepared datasets changed since the checkpoint")
    prepare = commands.add_parser("prepare", help="build the corpus, tokenizer and indexed datasets of a config")
    add_config_args(prepare)
    from .data.prepare_cli import add_prepare_args

    add_prepare_args(prepare)
    plot = commands.add_parser("plot", help="write the PNG plots of a run directory")
    plot.add_argument("run_dir")
    plot.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    import importlib

    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(commands)
    return parser


def _info(config: Config, world_size: int | None) -> None:
    from .model.size import flops_per_token, matmul_parameters, parameter_count

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank would print the same tables
        return

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
    from .schedule.checks import plan_warnings
    from .schedule.from_config import plan_for

    plan = plan_for(config)
    print(plan.report())
    for line in plan_warnings(config, plan):
        print(f"megacrystal: warning: {line}", file=sys.stderr)


def _train(config: Config, args: argparse.Namespace) -> int:
    from .train.loop import train
    from .train.signals import EXIT_PREEMPTED, Preempted, note_early_stops

    note_early_stops(config.checkpoint.stop_signals)
    _start_notes(config, args.overrides, args.resume)
    try:
        train(config, resume=args.resume)
    except Preempted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megacrystal: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except RuntimeError as err:  # a collective failed: another rank (or its node) died
        if args.debug or not _peer_lost(err):
            raise
        limit = os.environ.get("MEGACRYSTAL_DIST_TIMEOUT_S")
        cause = f"a peer stopped answering for {limit} s (MEGACRYSTAL_DIST_TIMEOUT_S)" \
            if limit and "timeout" in str(err).lower() else "another rank or its node died"
        print(f"megacrystal: error: rank {os.environ.get('RANK', '0')} lost a peer rank "
              f"({' '.join(str(err).split())[:200]}): {cause}, see its log; "
              f"{_latest_checkpoint(config)}; relaunch to resume from it", file=sys.stderr)
        return 1
    return 0


def _start_notes(config: Config, overrides: list[str], resume: str | None) -> None:
    """Warnings about the plan, and where each phase override takes effect (rank 0, before any work)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from .schedule.checks import override_notes, plan_warnings
    from .schedule.from_config import plan_for

    plan = plan_for(config)
    for line in plan_warnings(config, plan):
        print(f"megacrystal: warning: {line}", file=sys.stderr)
    for line in override_notes(overrides, plan, _resume_step(config, resume) if resume else None):
        if line.startswith("warning: "):
            print(f"megacrystal: {line}", file=sys.stderr)
        else:
            print(line)
    sys.stdout.flush()


def _resume_step(config: Config, resume: str) -> int | None:
    """The step `--resume` will start from, read without verifying (train() resolves it for real)."""
    import json
    from pathlib import Path

    from .checkpoint import CheckpointStore

    if resume == "none":
        return None
    try:
        path = Path(config.checkpoint_dir()) if resume == "auto" else Path(resume)
        if not (path / "trainer_state.json").is_file():
            path = CheckpointStore(path, recover=False).latest()
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, TypeError, ValueError):
        return None
    return None if state.get("weights_only") else int(state["step"])


def _peer_lost(err: BaseException) -> bool:
    from .launch.torchrun import PEER_TROUBLE

    return any(s in str(err).lower() for s in PEER_TROUBLE)


def _latest_checkpoint(config: Config) -> str:
    from .checkpoint import CheckpointStore

    latest = CheckpointStore(config.checkpoint_dir(), recover=False).latest()
    return f"the latest good checkpoint is {latest}" if latest else "there is no checkpoint yet"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        bound_retained_memory()  # a long streaming pass: flat peak memory
        # prepare runs no BLAS; numpy's OpenBLAS would start a thread per core that spins after start-up, taking
        # CPU from the tokenizer threads. Set before numpy is imported (the parser imports none).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    else:
        keep_freed_memory()  # training steps reuse the same large blocks
    if not args.debug:
        quiet_expected_warnings()
    else:
        os.environ["MEGACRYSTAL_DEBUG"] = "1"  # read where the work starts (distributed/cpu_compat.py's list)
    try:
        if getattr(args, "handler", None):
            return args.handler(args)
        if args.command == "plot":
            from .train.plots import plot_run

            for path in plot_run(args.run_dir):
                print(path)
            return 0
        if getattr(args, "allow_data_change", False):
            args.overrides.append("data.allow_data_change=true")
        config = load_config(args.config, args.overrides)
        if args.command == "prepare":
            from .data.prepare_cli import run_prepare

            return run_prepare(args, config)
        elif args.command == "info":
            _info(config, args.world_size)
        elif args.command == "train":
            return _train(config, args)
        return 0
    except (ConfigError, DataError, CheckpointError) as err:
        if args.debug:
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # one line, from one rank
            print(f"megacrystal: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`megacrystal info ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not raise again
        return 141
