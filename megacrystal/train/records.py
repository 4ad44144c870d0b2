"""The step records of metrics.jsonl (design.md's metrics contract): one typed shape, written and read here.

One JSON object per step. The keys are the contract's (step, phase, tokens, loss, lr, grad_norm, step_time_s,
tokens_per_s, tflops_per_device, mfu, per-dataset samples and consumed tokens) plus a few timings; a step that
evaluated also carries its EvalRecord under `val_*` keys, so every line is one step and line n is step n.

Schema versions: 1 is the shape written since the contract was set, with or without the "version" key (files
written before the key existed read as version 1). A new optional field (None = absent, not written) needs no new
version; a removed, renamed or re-meant key does, and `from_json` then converts the older shape.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator

from ..config import ConfigError

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.jsonl"


@dataclass
class EvalRecord:
    """Held-out evaluation at one step: mean token loss per dataset, and bits per byte where measured."""

    loss_per_dataset: dict[str, float]
    bpb: float | None = None
    bpb_per_dataset: dict[str, float] | None = None

    # field -> JSON key inside the step's object (val_loss is the contract's name since version 1)
    KEYS: ClassVar[dict[str, str]] = {"loss_per_dataset": "val_loss", "bpb": "val_bpb",
                                      "bpb_per_dataset": "val_bpb_per_dataset"}

    def to_json(self) -> dict[str, Any]:
        """The `val_*` keys this evaluation adds to its step's object (None fields left out)."""
        return {key: getattr(self, name) for name, key in self.KEYS.items() if getattr(self, name) is not None}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EvalRecord | None:
        """The evaluation a step's object carries, or None when that step did not evaluate."""
        if EvalRecord.KEYS["loss_per_dataset"] not in obj:
            return None
        return cls(**{name: obj.get(key) for name, key in cls.KEYS.items()})


@dataclass(kw_only=True)
class StepRecord:
    """One optimizer step, as logged on the main rank after the step (cumulative counts include it).

    Field order is the JSON key order; `eval`'s keys go where version 1 put val_loss.
    """

    step: int  # 1-based: the number of steps done
    phase: str
    tokens: int  # cumulative over the run
    loss: float
    lr: float
    grad_norm: float
    skipped: bool = False  # the optimizer skipped the step (bf16 overflow)
    step_time_s: float
    data_time_s: float = 0.0  # part of step_time_s: drawing, reading and slicing the batch
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None  # None without train.peak_tflops_per_device
    samples: dict[str, int]  # samples drawn from each dataset in this step
    consumed_tokens: dict[str, int]  # cumulative tokens drawn from each dataset
    loss_per_dataset: dict[str, float] | None = None  # this step's training loss split by dataset
    blend_weights: dict[str, float] | None = None  # the weights this step's batch was drawn with (online mixing)
    eval: EvalRecord | None = None
    events: list[str] | None = None  # e.g. a blend change on resume
    memory_mb: float | None = None  # the largest peak memory of any rank
    log_time_s: float = 0.0  # writing the previous step's record and progress line (between steps)
    version: int = SCHEMA_VERSION

    # left out of the JSON when None
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"loss_per_dataset", "blend_weights", "events"})

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this step (a fresh dict; nested dicts are shared, not copied)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "eval":
                out.update(value.to_json() if value is not None else {})
            elif value is not None or f.name not in self._OPTIONAL:
                out[f.name] = value
        return out

    def to_line(self) -> str:
        """One line of metrics.jsonl (non-finite floats as JSON's NaN/Infinity, as json.loads reads them)."""
        return json.dumps(self.to_json(), allow_nan=True)

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "record") -> StepRecord:
        """A record from its JSON object; keys this version does not know are ignored (newer optional fields)."""
        version = obj.get("version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigError(f"{where}: metrics schema version {version!r}, this megacrystal reads up to "
                              f"{SCHEMA_VERSION}; read it with the megacrystal that wrote it")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in obj]
        if missing:
            raise ConfigError(f"{where}: not a step record, missing {', '.join(missing)} (metrics contract keys)")
        values = {f.name: obj[f.name] for f in fields(cls) if f.name in obj and f.name not in ("eval", "version")}
        return cls(**values, version=version, eval=EvalRecord.from_json(obj))


def metrics_path(run_dir: str | Path) -> Path:
    """Where a run directory keeps its step records."""
    return Path(run_dir) / METRICS_FILE


def iter_records(path: str | Path) -> Iterator[StepRecord]:
    """The step records of a metrics.jsonl file, in file order; a bad line is a one-line ConfigError."""
    path = Path(path)
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not JSON ({e.msg}); a step record per line expected") from None
            yield StepRecord.from_json(obj, where=f"{path}:{number}")


def read_records(run_dir: str | Path) -> list[StepRecord]:
    """Every step record of a run directory (a one-line ConfigError when it has none)."""
    path = metrics_path(run_dir)
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS_FILE}; pass the run.dir of a training run")
    return list(iter_records(path))


def count_records(run_dir: str | Path) -> int:
    """How many steps a (possibly running) run has logged, without parsing them; 0 before the first."""
    try:
        return metrics_path(run_dir).read_text().count("\n")
    except OSError:
        return 0


class RecordsFile:
    """metrics.jsonl opened for appending, after dropping the records of steps a resumed run redoes."""

    def __init__(self, run_dir: Path, resumed_step: int = 0):
        self.path = metrics_path(run_dir)
        truncate_jsonl(self.path, resumed_step)
        self._file = open(self.path, "a", buffering=1)

    def append(self, record: StepRecord) -> None:
        """Write one record as one line (line-buffered: readers see whole steps)."""
        self._file.write(record.to_line() + "\n")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the lines of steps after `after_step` of a per-step .jsonl file (metrics, samples): an atomic rewrite."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
