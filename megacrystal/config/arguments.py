"""Command-line arguments every command shares: --config/--set/--debug, and argparse types for numeric flags.

A bad number is argparse's one-line usage error, never a traceback later.

`--nodes 0` reaching a division, `--steps -3` an empty loop or `--efficiency 2` a prediction above the peak all
stop at the parser with `megacrystal <cmd>: error: argument --flag: ...` (exit 2).
"""
from __future__ import annotations

import argparse
import math


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1."""
    return [positive_int(part) for part in text.split(",")]


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config, --set and --debug, as every config-driven command takes them."""
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/crystal-tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted name, e.g. --set parallel.tp=2")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
