"""The metrics contract's two outputs: step records in metrics.jsonl (train/records.py) and TensorBoard scalars."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .records import RecordsFile, StepRecord


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
        self._records = RecordsFile(run_dir, resumed_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, record: StepRecord) -> None:
        """Log one record; numeric fields (and nested dicts of numbers) also go to TensorBoard."""
        if not self.enabled:
            return
        self._records.append(record)
        for key, value in record.to_json().items():
            if key in ("step", "version"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if _is_number(v):
                        self._tb.add_scalar(f"{key}/{sub}", v, record.step)
            elif _is_number(value):
                self._tb.add_scalar(f"train/{key}", value, record.step)

    def close(self) -> None:
        if self.enabled:
            self._records.close()
            self._tb.close()
            self.enabled = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
