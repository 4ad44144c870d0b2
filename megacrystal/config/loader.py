"""Load a YAML run config, apply dotted `--set key=value` overrides, validate once."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from .errors import ConfigError
from .schema import Config


def read_yaml(path: str | Path, flag: str, example: str):
    """The parsed YAML file given by `flag` ({} when empty); one-line errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag}: no such file {path}; pass a YAML file such as {example}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read `path`, apply `a.b.c=value` overrides (values parsed as YAML), and validate."""
    raw = read_yaml(path, "--config", "configs/crystal-tiny.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, optim, ...)")
    return config_from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of `raw` with each `dotted.key=value` override set."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
            raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. parallel.tp=2")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # plain strings need no quoting
        parts = key.split(".")
        _check_named_entry(raw, parts, ("data", "phases"), "phase")
        _check_named_entry(raw, parts, ("data", "datasets"), "dataset")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _check_named_entry(raw: dict, parts: list[str], section: tuple[str, ...], what: str) -> None:
    """An override may change a phase or dataset the config defines, not invent one by a typo."""
    if len(parts) <= len(section) + 1 or tuple(parts[:len(section)]) != section:
        return
    node = raw
    for part in section:
        node = node.get(part) if isinstance(node, dict) else None
    known = list(node) if isinstance(node, dict) else []
    if parts[len(section)] not in known:
        raise ConfigError(f"--set {'.'.join(parts)}: unknown {what} {parts[len(section)]!r}; "
                          f"{'.'.join(section)} has {', '.join(known) or 'none'}")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, turning the first problem into a one-line ConfigError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err.errors()[0])) from None


def _describe(error: dict) -> str:
    msg = str(error.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if msg.startswith("@"):  # cross-field check from schema._require: "@field: message"
        return msg[1:]
    field = ".".join(str(p) for p in error.get("loc", ())) or "config"
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{field}: unknown key; check the spelling against configs/crystal-tiny.yaml"
    if kind == "missing":
        return f"{field}: required but missing"
    got = error.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return f"{field}: {msg[0].lower() + msg[1:]}{shown}"


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML (written to the run dir as config.resolved.yaml)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
