"""Progress lines of a long data pass: plain periodic lines when the stream is not a terminal."""
import io

from megacrystal.data import progress
from megacrystal.data.progress import Progress


def test_plain_lines_with_docs_rates_and_eta(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = Progress("prepare web", total_bytes=4_000_000, stream=out)
    bar.update(10, 1_000_000, 250_000)
    bar.file_done(2_000_000)
    bar.update(10, 1_000_000, 250_000)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("prepare web: 10 docs, 1.0 MB (") and "25%" in lines[0]
    assert "20 docs, 2.0 MB" in lines[1] and "500,000 tokens" in lines[1] and "tokens/s" in lines[1]
    assert "MB/s" in lines[1] and "75%" in lines[1] and "ETA 0:00:0" in lines[1]


def test_disabled_prints_nothing():
    out = io.StringIO()
    bar = Progress("x", 10, enabled=False, stream=out)
    bar.update(1, 1, 1)
    bar.close()
    assert out.getvalue() == ""
