"""The metrics contract: one JSON object per logged step in metrics.jsonl, the same scalars in TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the records of steps after `after_step` (a resumed run rewrites them) by an atomic rewrite."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsWriter:
    """Appends to <run>/metrics.jsonl and writes TensorBoard events (main rank only).

    A run resumed after step k first drops the records (and TensorBoard events) of later steps, so the files
    always describe one consistent run (a fresh run, k = 0, drops them all).
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resumed_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(run_dir / "metrics.jsonl", resumed_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Log one record; numeric fields (and nested dicts of numbers) also go to TensorBoard."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if _is_number(v):
                        self._tb.add_scalar(f"{key}/{sub}", v, step)
            elif _is_number(value):
                self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()
            self._tb.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
