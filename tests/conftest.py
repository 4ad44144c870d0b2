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


SYNTHETIC = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96, "vocab_size": 128,
              "seq_length": 32},
    "optim": {"lr": 0.01, "warmup_steps": 2},
    "train": {"steps": 12, "global_batch_size": 8, "micro_batch_size": 2, "threads": 1, "log_interval": 1},
    "checkpoint": {"interval": 2, "keep": 20},
}


@pytest.fixture(scope="session")
def synthetic_config(tmp_path_factory) -> Path:
    """A YAML config of a very small Crystal on the synthetic stream: 12 steps, a checkpoint every 2."""
    import yaml

    path = tmp_path_factory.mktemp("synthetic") / "synthetic.yaml"
    path.write_text(yaml.safe_dump(SYNTHETIC))
    return path
