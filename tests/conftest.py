"""Session fixtures shared across test packages."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> list[str]:
    """`megacrystal prepare` of the tiny config (corpus, tokenizer, datasets); returns the --set to use it."""
    data_dir = tmp_path_factory.mktemp("tiny-data")
    overrides = ["--set", f"data.dir={data_dir}"]
    out = subprocess.run([sys.executable, "-m", "megacrystal", "prepare", "--config", TINY, *overrides],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return overrides
