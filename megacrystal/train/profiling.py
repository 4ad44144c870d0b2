"""torch.profiler over a window of steps (`train.profile_steps`): a per-op table and a Chrome trace per rank."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class StepProfiler:
    """Profiles steps first..last (1-based, inclusive); does nothing when no window is configured."""

    def __init__(self, window: tuple[int, int] | None, run_dir: Path, rank: int):
        self.window, self.out, self.rank = window, Path(run_dir) / "profile", rank
        self._profiler: torch.profiler.profile | None = None

    def around(self, step: int):
        """Context for 0-based `step`: starts the profiler at the window's first step, writes it after its last."""
        if not self.window or not self.window[0] <= step + 1 <= self.window[1]:
            return contextlib.nullcontext()
        return self._window_step(step + 1)

    @contextlib.contextmanager
    def _window_step(self, step: int):
        if self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self._profiler.__enter__()
        with torch.profiler.record_function(f"step {step}"):
            yield
        if step == self.window[1]:
            self._write()

    def _write(self) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=40)
        (self.out / f"ops_rank{self.rank}.txt").write_text(table + "\n")
        profiler.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
