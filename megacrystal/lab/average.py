"""Checkpoint averaging: the mean of the weights of the last K checkpoints of a phase (or of given checkpoints),
written as a Hugging Face CrystalCoder directory (score it, or `megacrystal import hf` it to train on).

Averaging the checkpoints of a decay or cooldown phase is a cheap stand-in for a longer decay (Sanyal et al.,
2023, LAWA; used with WSD by Hägele et al., 2024). The mean is taken in float64 over each checkpoint's full
fp32 weights (their master copy when the run trained in bf16), then stored as fp32: exact up to that rounding.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint.errors import CheckpointError
from ..checkpoint.store import CheckpointStore
from ..config import ConfigError
from ..config.arguments import positive_int


def phase_checkpoints(root: str | Path, phase: str, last: int) -> list[Path]:
    """The newest `last` complete checkpoints under `root` whose trainer state is in `phase`, oldest first."""
    from ..export.gather import trainer_state

    if last < 1:
        raise ConfigError(f"--last: {last}; average at least one checkpoint")
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"--checkpoints {root}: no such directory; pass a run's checkpoint directory")
    found = [p for p in CheckpointStore(root, recover=False).list() if trainer_state(p).get("phase") == phase]
    if len(found) < last:
        raise CheckpointError(f"{root}: {len(found)} checkpoints of phase {phase!r}, {last} asked for; keep more "
                              "(checkpoint.keep) or average fewer (--last)")
    return found[-last:]


def average_weights(paths: list[Path]):
    """A Gathered whose weights are the element-wise mean of the checkpoints' weights (same model required)."""
    import torch

    from ..export.gather import Gathered, gather

    total, first = None, None
    for path in paths:
        g = gather(path)
        if first is None:
            first, total = g, {k: v.to(torch.float64) for k, v in g.weights.items()}
            continue
        if g.config.model != first.config.model:
            raise CheckpointError(f"{path}: another model than {first.path}; average checkpoints of one run")
        for k, v in g.weights.items():
            total[k] += v.to(torch.float64)
    weights = {k: (v / len(paths)).to(torch.float32) for k, v in total.items()}
    return Gathered(first.path, first.config, first.state, weights, f"mean of {len(paths)} checkpoints")


def register(subparsers) -> None:
    """Add the `average` subcommand."""
    p = subparsers.add_parser("average", help="average the weights of the last K checkpoints of a phase")
    p.add_argument("paths", nargs="*", help="checkpoint directories to average (or use --checkpoints/--phase)")
    p.add_argument("--checkpoints", help="a run's checkpoint directory, with --phase and --last")
    p.add_argument("--phase", help="the phase whose last checkpoints are averaged")
    p.add_argument("--last", type=positive_int, default=3, help="how many of the phase's newest checkpoints (default 3)")
    p.add_argument("--out", required=True, help="Hugging Face directory to write")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    p.set_defaults(handler=_average)


def _average(args) -> int:
    from ..export.hf import export_hf
    from ..export.score import tokenizer_model_path

    if bool(args.paths) == bool(args.checkpoints):
        raise ConfigError("give either checkpoint directories or --checkpoints DIR --phase NAME [--last K] "
                          "(exactly one of the two)")
    if args.checkpoints and not args.phase:
        raise ConfigError("--checkpoints needs --phase NAME")
    paths = [Path(p) for p in args.paths] or phase_checkpoints(args.checkpoints, args.phase, args.last)
    averaged = average_weights(paths)
    tokenizer = tokenizer_model_path(averaged.config, None)
    files = export_hf(averaged, Path(args.out), ("safetensors",), 5 << 30, tokenizer if tokenizer.is_file() else None)
    print(f"averaged {', '.join(str(p) for p in paths)}")
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0
