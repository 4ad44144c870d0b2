"""Progress of a long data pass: documents, MB/s, tokens/s and ETA; a live line on a TTY, plain lines otherwise."""
from __future__ import annotations

import sys
import time

PLAIN_INTERVAL_S = 30.0  # a log file gets a line this often, not a redraw per batch
TTY_INTERVAL_S = 0.5


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts documents, text bytes and tokens against the input bytes to do."""

    def __init__(self, label: str, total_bytes: int, enabled: bool = True, stream=None):
        self.label, self.total = label, max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.docs = self.text_bytes = self.tokens = self.files_bytes = 0
        self._file_text = 0  # text bytes read from the files not yet finished
        self.start = self._last = time.perf_counter()

    def update(self, docs: int, text_bytes: int, tokens: int) -> None:
        """Add one batch's counts; print when the interval has passed."""
        self.docs += docs
        self.text_bytes += text_bytes
        self._file_text += text_bytes
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and now - self._last >= (TTY_INTERVAL_S if self.tty else PLAIN_INTERVAL_S):
            self._last = now
            self._print(now)

    def file_done(self, nbytes: int) -> None:
        """A group of input files of nbytes on disk is finished."""
        self.files_bytes += nbytes
        self._file_text = 0

    def line(self, now: float | None = None) -> str:
        """The current progress line."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        done = min(self.files_bytes + self._file_text, self.total) / self.total
        eta = _eta(elapsed * (1 - done) / done) if done > 0 else "?"
        return (f"{self.label}: {self.docs:,} docs, {self.text_bytes / 1e6:,.1f} MB "
                f"({self.text_bytes / 1e6 / elapsed:.2f} MB/s), {self.tokens:,} tokens "
                f"({self.tokens / elapsed:,.0f} tokens/s), {done:.0%}, ETA {eta}")

    def _print(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now)[:200] + "\x1b[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End a live line."""
        if self.tty and self.docs:
            self._print(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
