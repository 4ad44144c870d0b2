"""One progress line per log interval: step, loss, lr, throughput and ETA."""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Prints `step 40/100 | loss 4.123 | lr 1.00e-03 | 12.3k tok/s | ETA 1m20s` lines to stdout."""

    def __init__(self, total_steps: int, first_step: int = 0, enabled: bool = True, stream=sys.stdout):
        self.total, self.enabled, self.stream = total_steps, enabled, stream
        self._start_step, self._start = first_step, time.perf_counter()

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        done = step + 1 - self._start_step
        elapsed = time.perf_counter() - self._start
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        rate = f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"
        text = (f"step {step + 1}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {rate} tok/s"
                f" | ETA {_duration(eta)}{' | ' + extra if extra else ''}")
        print(text, file=self.stream, flush=True)
