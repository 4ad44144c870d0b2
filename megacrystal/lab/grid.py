"""An ablation grid: a base config and named variants, each a list of dotted overrides (as `--set` takes them).

    base: code-cooldown.yaml          # relative to this file; `megacrystal ablate --config` may replace it
    set: [train.log_interval=10]      # overrides every variant gets (optional)
    variants:
      code-00: {data.phases.stable.weights: {prose: 1.0, python: 0.0, web: 0.0}}
      code-25: ["data.phases.stable.weights.prose=0.75", ...]
A variant is a mapping {dotted key: value} or a list of "key=value" strings. Every variant's config is loaded
and validated when the grid is read, so a typo fails before any training starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Config, ConfigError, load_config, read_yaml

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Variant:
    """One variant: its name, its overrides (common ones first) and its validated config."""

    name: str
    overrides: tuple[str, ...]
    config: Config


@dataclass(frozen=True)
class Grid:
    """A loaded grid: the base config path and its variants, in file order."""

    path: Path
    base: Path
    variants: tuple[Variant, ...]

    @property
    def name(self) -> str:
        """The grid's name: its file name without the extension."""
        return self.path.stem


def _as_overrides(value, where: str) -> list[str]:
    if isinstance(value, dict):
        return [f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where}: expected a mapping of dotted keys to values or a list of key=value strings")


def load_grid(path: str | Path, base: str | Path | None = None, extra: list[str] = ()) -> Grid:
    """Read and validate a grid YAML; `base` (else the file's `base:`) is the config every variant starts from."""
    path = Path(path)
    raw = read_yaml(path, "--grid", "configs/lab/code-fraction-grid.yaml")
    if not isinstance(raw, dict) or not isinstance(raw.get("variants"), dict) or not raw["variants"]:
        raise ConfigError(f"{path}: needs a non-empty `variants:` mapping of variant name -> overrides")
    unknown = sorted(set(raw) - {"base", "set", "variants"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a grid has base, set and variants")
    if base is None:
        if "base" not in raw:
            raise ConfigError(f"{path}: no `base:` config; add one or pass --config")
        base = path.parent / raw["base"]
    common = _as_overrides(raw.get("set", []), f"{path}: set") + list(extra)
    variants = []
    for name, value in raw["variants"].items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{path}: variant name {name!r} must be letters, digits, '.', '_' or '-'")
        overrides = common + _as_overrides(value, f"{path}: variant {name}")
        try:
            config = load_config(base, overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: variant {name}: {err}") from None
        variants.append(Variant(name, tuple(overrides), config))
    return Grid(path, Path(base), tuple(variants))
