"""The `megacrystal` command as operators use it: info, train (one process and torchrun), one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "crystal-tiny.yaml")


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


@pytest.mark.parametrize("overrides, message", [
    (["--set", "data.phases.warmup.tokens=5"], "unknown phase 'warmup'; data.phases has text, mixed, code"),
    (["--set", "data.phases.mixed.weights.rust=0.5"], "data.phases.mixed.weights.rust: unknown dataset"),
    (["--set", "data.phases.mixed.weights.web=-0.2", "--set", "data.phases.mixed.weights.prose=0.9"],
     "data.phases.mixed.weights.web: negative weight -0.2"),
    (["--set", "data.phases.mixed.weights.web=0.5"], "data.phases.mixed.weights: sum to 1.3, not 1"),
])
def test_bad_phase_overrides_fail_in_one_line(tmp_path, overrides, message):
    out = megacrystal("train", "--config", TINY, "--set", f"run.dir={tmp_path}/run", *overrides)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_renormalize_accepts_weights_not_summing_to_one(tmp_path):
    out = megacrystal("info", "--config", TINY, "--set", "data.phases.mixed.weights.web=0.5",
                      "--set", "data.renormalize=true")
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_damaged_or_foreign_datasets_fail_in_one_line(tmp_path, tiny_data):
    import shutil

    from megacrystal.data.tokenizer import train_tokenizer

    data = tmp_path / "data"
    shutil.copytree(tiny_data[1].split("=", 1)[1], data)
    (tmp_path / "other.txt").write_text("a different corpus entirely, for another tokenizer\n" * 200)
    other = train_tokenizer([tmp_path / "other.txt"], tmp_path / "other", 320)
    cases = [
        (["--set", "model.vocab_size=4096"], "prepared for vocabulary size 2048 but the tokenizer has 4096"),
        (["--set", f"data.tokenizer.model={other}"], "was tokenized with another tokenizer"),
    ]
    for overrides, message in cases:
        out = megacrystal("train", "--config", TINY, "--set", f"data.dir={data}", "--set",
                          f"run.dir={tmp_path}/run", *overrides)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    (data / "python-00000_train.idx").unlink()
    out = megacrystal("train", "--config", TINY, "--set", f"data.dir={data}", "--set", f"run.dir={tmp_path}/run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"dataset file {data}/python-00000_train.idx is missing; run `megacrystal prepare`" in out.stderr
    assert not (tmp_path / "run").exists()
