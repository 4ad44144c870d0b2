"""`megacrystal average`: the last K checkpoints of a phase, averaged, equal the mean of their separate exports."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacrystal.checkpoint.errors import CheckpointError
from megacrystal.lab.average import phase_checkpoints
from tests.export.readers import read_hf

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "megacrystal", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_average_of_the_last_checkpoints_of_a_phase(tmp_path, synthetic_config):
    _cli("train", "--config", str(synthetic_config), "--set", f"run.dir={tmp_path / 'run'}")
    root = tmp_path / "run" / "checkpoints"
    done = _cli("average", "--checkpoints", str(root), "--phase", "main", "--last", "2", "--out", str(tmp_path / "avg"))
    picked = [f"step_{s:09d}" for s in (10, 12)]  # 12 steps, a checkpoint every 2, the newest two
    assert all(p in done.stdout for p in picked)
    exports = []
    for name in picked:
        _cli("export", "hf", "--checkpoint", str(root / name), "--out", str(tmp_path / name))
        exports.append(read_hf(tmp_path / name)[1])
    _, averaged = read_hf(tmp_path / "avg")
    assert sorted(averaged) == sorted(exports[0])
    for key, value in averaged.items():
        mean = sum(e[key].double() for e in exports) / 2
        assert torch.equal(value, mean.float()), key
        assert not torch.equal(value, exports[-1][key]) or exports[0][key].equal(exports[-1][key])
    assert phase_checkpoints(root, "main", 6) == sorted(root.glob("step_*"))
    with pytest.raises(CheckpointError, match="6 checkpoints of phase 'main', 9 asked for"):
        phase_checkpoints(root, "main", 9)
    with pytest.raises(CheckpointError, match="0 checkpoints of phase 'cooldown'"):
        phase_checkpoints(root, "cooldown", 1)
