"""The `megacrystal` command as operators use it: info, train (one process and torchrun), one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")
FAST = ["--set", "train.steps=6", "--set", "train.log_interval=3", "--set", "train.threads=1"]


def megacrystal(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "megacrystal", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=600)


def test_info_prints_the_7b_parameter_count():
    out = megacrystal("info", "--config", "configs/crystal-7b.yaml", "--world-size", "64")
    assert out.returncode == 0, out.stderr
    assert "6,575,278,720" in out.stdout
    assert "world 64 = tp 2 x pp 4 x dp 8" in out.stdout


@pytest.mark.parametrize("overrides, env, field", [
    (["--set", "parallel.tpp=2"], {}, "parallel.tpp: unknown key"),
    (["--set", "train.steps=many"], {}, "train.steps: input should be a valid integer"),
    (["--set", "model.num_heads=3"], {}, "model.num_heads: 3 does not divide model.hidden_size"),
    (["--set", "parallel.tp=8"], {}, "parallel.tp: 8 does not divide model.num_heads"),
    (["--set", "parallel.pp=3"], {}, "parallel.pp: pp x vpp = 3 does not divide model.num_layers"),
    (["--set", "parallel.tp=2"], {"WORLD_SIZE": "3"}, "world size 3 is not divisible by tp x pp = 2"),
])
def test_train_rejects_bad_input_in_one_line_before_starting(tmp_path, overrides, env, field):
    out = megacrystal("train", "--config", TINY, "--set", f"run.dir={tmp_path}/run", *overrides, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and lines[0].startswith("megacrystal: error:"), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_writes_the_run_dir_and_torchrun_pipeline_matches(tmp_path):
    single = tmp_path / "single"
    out = megacrystal("train", "--config", TINY, "--set", f"run.dir={single}", *FAST)
    assert out.returncode == 0, out.stderr
    progress = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in progress] == ["step 3/6", "step 6/6"]
    assert all("tok/s" in line and "ETA" in line and "lr" in line for line in progress)

    records = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "tflops_per_device"):
        assert all(key in r for r in records), key
    assert records[-1]["tokens"] == 6 * 16 * 128

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(single / "tensorboard"))
    events.Reload()
    assert [round(e.value, 5) for e in events.Scalars("train/loss")] == [round(r["loss"], 5) for r in records]
    resolved = yaml.safe_load((single / "config.resolved.yaml").read_text())
    assert resolved["train"]["steps"] == 6 and resolved["run"]["dir"] == str(single)

    piped = tmp_path / "pp2"
    run = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", TINY, "--set", f"run.dir={piped}",
                          "--set", "parallel.pp=2", *FAST], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert _losses(piped) == pytest.approx(_losses(single), rel=1e-5, abs=0)
