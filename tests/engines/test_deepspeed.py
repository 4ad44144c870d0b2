"""The DeepSpeed engine: ZeRO 0-3 and TP=2 reproduce the megatron engine's single-process losses; bf16,
a merged user JSON, optimizer reset and the tiny curriculum through the CLI; one-line config errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megacrystal.config import ConfigError, config_from_dict, load_config
from megacrystal.engines import deepspeed_config as dsc
from tests.helpers import run_on_ranks

from .deepspeed_runs import suite, with_overrides

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = str(ROOT / "configs" / "crystal-tiny.yaml")
DS = {"engine": "deepspeed"}
ON_1_RANK = {"megatron": {}, "megatron_bf16": {"train.precision": "bf16"}, "zero0": {**DS, "deepspeed.zero_stage": 0}}
ON_2_RANKS = {
    "zero0_dp2": {**DS, "deepspeed.zero_stage": 0},
    "zero1_dp2": {**DS, "deepspeed.zero_stage": 1},
    "zero2_dp2": {**DS, "deepspeed.zero_stage": 2},
    "zero1_tp2": {**DS, "deepspeed.zero_stage": 1, "parallel.tp": 2},
}
# Small buckets: ZeRO-2 reduces and partitions in several pieces; same-valued batch fields are accepted.
USER_JSON = {"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": 20000, "allgather_bucket_size": 20000}}
# ZeRO-3 keeps parameters under 1e5 elements (all of TINY's) whole by default; 0 partitions every one of them,
# including the embedding that the tied output layer reads outside its own module.
ZERO3_JSON = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
EXACT = list(ON_2_RANKS) + ["zero3_dp2", "zero2_dp2_user_json", "zero0"]
RESET = {"megatron": {}, "deepspeed": {**DS, "deepspeed.zero_stage": 1}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    (folder / "user.json").write_text(json.dumps(USER_JSON))
    (folder / "zero3.json").write_text(json.dumps(ZERO3_JSON))
    two = {**ON_2_RANKS,
           "zero3_dp2": {**DS, "deepspeed.zero_stage": 3, "deepspeed.config": str(folder / "zero3.json")},
           "zero2_dp2_user_json": {**DS, "deepspeed.zero_stage": 2, "deepspeed.config": str(folder / "user.json")},
           "zero2_dp2_bf16": {**DS, "deepspeed.zero_stage": 2, "train.precision": "bf16"}}
    single = run_on_ranks(suite, 1, ON_1_RANK, RESET)[0]
    double = run_on_ranks(suite, 2, two)[0]
    return {**single["runs"], **double["runs"], "reset": single["reset"], "no_reset": single["no_reset"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_matches_megatron_single_process(runs, name):
    expected, got = runs["megatron"], runs[name]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=0)
    # TINY clips at every step, so DeepSpeed's pre-clip global grad norm is exercised too.
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4, abs=0)
    assert not any(got["skipped"])


@pytest.mark.slow
def test_bf16_zero2_tracks_megatron_bf16(runs):
    got, expected = runs["zero2_dp2_bf16"]["loss"], runs["megatron_bf16"]["loss"]
    assert all(math.isfinite(x) for x in got) and got[-1] < got[0]
    assert got == pytest.approx(expected, rel=1e-2)


@pytest.mark.slow
def test_reset_optimizer_matches_megatron(runs):
    assert runs["reset"]["deepspeed"] == pytest.approx(runs["reset"]["megatron"], rel=1e-4, abs=0)
    # Negative control: without the reset the curve leaves the reset one, so the comparison above is sharp.
    assert runs["no_reset"]["deepspeed"][2:] != pytest.approx(runs["reset"]["deepspeed"][2:], rel=1e-4, abs=0)


# -- the tiny curriculum through the CLI ---------------------------------------------------------------------
PHASES = ("text", "mixed", "code")
STEPS_PER_PHASE = 4


@pytest.mark.slow
def test_tiny_curriculum_trains_through_phases(tmp_path, tiny_data):
    tokens = STEPS_PER_PHASE * 16 * 128  # the tiny config's global batch x sequence
    short = [a for p in PHASES for a in ("--set", f"data.phases.{p}.tokens={tokens}",
                                         "--set", f"data.phases.{p}.lr.warmup_steps=2")]  # within the phase
    out = subprocess.run(
        [sys.executable, "-m", "megacrystal", "train", "--config", TINY_YAML, "--set", "engine=deepspeed",
         "--set", "deepspeed.zero_stage=2", "--set", f"run.dir={tmp_path}", "--set", "train.threads=1",
         "--set", "train.log_interval=4", "--set", "data.eval_interval=100", *tiny_data, *short],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no warnings: DeepSpeed's are avoided or filtered
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == [p for p in PHASES for _ in range(STEPS_PER_PHASE)]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert "phase code: starting from weights only" in out.stdout
    assert [set(r["val_loss"]) for r in records if "val_loss" in r] == [{"prose", "python", "web"}] * 3


# -- one-line configuration errors (no process group) --------------------------------------------------------
def _config(**overrides):
    return config_from_dict(with_overrides({**DS, **overrides}))


def _one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("stage", [-1, 4])
def test_zero_stage_outside_0_to_3(stage):
    with pytest.raises(ConfigError) as err:
        _config(**{"deepspeed.zero_stage": stage})
    _one_line(err, "deepspeed.zero_stage")


def test_pipeline_parallel_refused():
    with pytest.raises(ConfigError) as err:
        _config(**{"parallel.pp": 2})
    _one_line(err, "parallel.pp", "deepspeed")


@pytest.mark.parametrize("field,value", [("parallel.sp", True), ("parallel.distributed_optimizer", True)])
def test_megatron_only_features_refused(field, value):
    with pytest.raises(ConfigError) as err:
        dsc.validate(_config(**{"parallel.tp": 2, field: value}), world_size=2)
    _one_line(err, field)


def test_generated_config():
    ds = dsc.validate(_config(**{"deepspeed.zero_stage": 2, "optim.clip_grad": 0.5}), world_size=2)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # 8 / (2 x dp 2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False}
    assert dsc.validate(_config(**{"train.precision": "bf16"}), world_size=1)["bf16"] == {"enabled": True}


def _with_json(tmp_path, data, **overrides):
    path = tmp_path / "ds.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return _config(**{"deepspeed.config": str(path), **overrides})


def test_user_json_deep_merged(tmp_path):
    user = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "gradient_accumulation_steps": 2,
            "bf16": {"enabled": False}, "fp16": {"enabled": False}, "wall_clock_breakdown": True}
    ds = dsc.validate(_with_json(tmp_path, user), world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["wall_clock_breakdown"] is True and ds["train_batch_size"] == 8


@pytest.mark.parametrize("field,value", [
    ("train_batch_size", 16), ("train_micro_batch_size_per_gpu", 4), ("gradient_accumulation_steps", 4),
    ("gradient_clipping", 1.0), ("zero_optimization.stage", 3), ("bf16.enabled", True)])
def test_user_json_conflicting_field(tmp_path, field, value):
    *parents, key = field.split(".")
    user = {key: value}
    for part in reversed(parents):
        user = {part: user}
    with pytest.raises(ConfigError) as err:
        dsc.validate(_with_json(tmp_path, user), world_size=2)
    _one_line(err, "deepspeed.config", field)


@pytest.mark.parametrize("user,words", [
    ({"optimizer": {"type": "Adam"}}, ["'optimizer'", "optim."]),
    ({"scheduler": {"type": "WarmupLR"}}, ["'scheduler'"]),
    ({"fp16": {"enabled": True}}, ["'fp16'", "train.precision"]),
    ("{not json", ["not valid JSON"]),
    ([1, 2], ["JSON object"]),
])
def test_user_json_refused(tmp_path, user, words):
    with pytest.raises(ConfigError) as err:
        dsc.validate(_with_json(tmp_path, user), world_size=1)
    _one_line(err, "deepspeed.config", *words)


def test_user_json_missing_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        dsc.validate(_config(**{"deepspeed.config": str(tmp_path / "nope.json")}), world_size=1)
    _one_line(err, "deepspeed.config", "no such file")


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_offload_without_compiler(tmp_path, monkeypatch, section):
    config = _with_json(tmp_path, {"zero_optimization": {section: {"device": "cpu"}}}, **{"deepspeed.zero_stage": 3})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ConfigError) as err:
        dsc.validate(config, world_size=1)
    _one_line(err, f"zero_optimization.{section}", "C++ compiler")
    monkeypatch.setenv("CXX", sys.executable)  # any executable passes the check
    assert dsc.offload_devices(dsc.validate(config, world_size=1)) == [section]


def test_offload_device_none_needs_no_compiler(tmp_path, monkeypatch):
    config = _with_json(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert dsc.offload_devices(dsc.validate(config, world_size=1)) == []


def test_cli_prints_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", TINY_YAML,
                          "--set", "engine=deepspeed", "--set", "parallel.pp=2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("megacrystal: error: parallel.pp"), out.stderr


def test_load_config_accepts_engine_deepspeed():
    config = load_config(TINY_YAML, ["engine=deepspeed", "deepspeed.zero_stage=3"])
    assert config.engine == "deepspeed" and config.deepspeed.zero_stage == 3
