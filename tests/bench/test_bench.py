"""`megacrystal bench`: sweep parsing, and a real two-point sweep that writes its report and plots."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megacrystal.bench.peaks import device_peak_tflops
from megacrystal.bench.sweep import parse_sweep, plan_points
from megacrystal.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_is_the_cartesian_product():
    points = plan_points(parse_sweep("dp=1,2;tp=1,2;mbs=2"))
    assert [p.name for p in points] == ["dp1_tp1_mbs2", "dp1_tp2_mbs2", "dp2_tp1_mbs2", "dp2_tp2_mbs2"]
    assert [p.world_size for p in points] == [1, 2, 2, 4]


@pytest.mark.parametrize("spec", ["", "gpus=1,2", "tp=", "tp"])
def test_bad_sweeps_are_one_line_errors(spec):
    with pytest.raises(ConfigError, match="--sweep"):
        parse_sweep(spec)


@pytest.mark.parametrize("repeat", ["0", "-1"])
def test_bad_repeat_is_a_one_line_error(repeat, synthetic_config, tmp_path, capsys):
    from megacrystal.cli import main

    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exited:  # refused by the parser (config.arguments.positive_int)
        main(["bench", "--config", str(synthetic_config), "--sweep", "dp=1", "--repeat", repeat, "--out", str(out)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"megacrystal bench: error: argument --repeat: must be a positive integer, got {repeat}")
    assert not out.exists()


def test_dense_peaks_by_device_name():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3 SXM", "bf16") == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0  # the SXM board's CUDA name
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert device_peak_tflops("Some Future GPU", "bf16") is None


@pytest.mark.parametrize("args, error", [
    (["--sweep", "tp=2"], "--host-ceiling: the sweep needs a 1-process point to copy"),
    (["--sweep", "dp=1,2", "--set", "train.global_batch_size=6"],
     "--host-ceiling: train.global_batch_size 6 does not split into 2 copies of whole micro-batches of 2"),
])
def test_bad_host_ceiling_is_a_one_line_error(args, error, synthetic_config, tmp_path, capsys):
    from megacrystal.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--config", str(synthetic_config), "--host-ceiling", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"megacrystal: error: {error}"), err
    assert not out.exists()


def _rate(run_dirs: list[Path], warmup: int) -> float:
    """tokens/s from metrics.jsonl files, computed here: tokens per step over the median timed step."""
    import statistics

    records = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in run_dirs]
    return records[0][0]["tokens"] / statistics.median(r["step_time_s"] for run in records for r in run[warmup:])


@pytest.mark.slow
def test_two_point_sweep_in_two_rounds_writes_report_and_plots(synthetic_config, tmp_path):
    out = subprocess.run([sys.executable, "-m", "megacrystal", "bench", "--config", str(synthetic_config),
                          "--sweep", "dp=1,2", "--steps", "8", "--warmup", "3", "--repeat", "2", "--host-ceiling",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["name"] for p in report["points"]] == ["dp1", "dp2"]
    assert report["command"].startswith("megacrystal bench --config ")  # no machine-specific script path
    for point in report["points"]:
        assert point["tokens_per_s"] > 0 and 0 < point["mfu"] < 1
        assert 0 < point["measured"]["data_and_log_share"] < 1
        # both rounds' timed steps pooled: the point's median lies between the rounds' medians
        rounds = point["measured"]["round_step_times_s"]
        assert point["measured"]["steps_timed"] == 10 and len(rounds) == 2
        assert min(rounds) <= point["measured"]["step_time_s"] <= max(rounds)
        for round_dir in ("round1", "round2"):
            assert (tmp_path / "points" / point["name"] / round_dir / "metrics.jsonl").exists()
    # rounds interleave the points (a drifting host moves both alike); the baseline runs once
    order = [out.stdout.index(f"[{i}/2, round {r}/2]") for r, i in ((1, 1), (1, 2), (2, 1), (2, 2))]
    assert order == sorted(order) and out.stdout.count("baseline (plain PyTorch eager)") == 1
    assert "Median step time of each round" in (tmp_path / "report.md").read_text()
    assert report["points"][0]["scaling_efficiency"] == 1.0
    assert "| dp2 | 2 |" in (tmp_path / "report.md").read_text()
    baseline = report["baselines"]["mbs2_fp32"]
    assert baseline["step_time_s"] > 0 and report["points"][0]["step_time_vs_baseline"] > 0
    assert "Plain-PyTorch eager baseline" in (tmp_path / "report.md").read_text()
    # measured right after the point it is compared with, not after the whole sweep (CPU speed drifts)
    assert order[0] < out.stdout.index("baseline (plain PyTorch eager)") < order[1]
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "mfu.png").stat().st_size > 0
    # host ceiling: two 1-process copies ran together in each round, each on half the batch, and their summed rate
    # is the ceiling the dp2 point is set against
    copies = [[tmp_path / "points" / f"ceiling2_copy{k}" / r for r in ("round1", "round2")] for k in (1, 2)]
    for runs in copies:
        for run in runs:
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert records[0]["tokens"] == report["points"][1]["measured"]["tokens_per_step"] // 2
    ceiling = report["host_ceiling"]["2"]
    assert ceiling["tokens_per_s"] == pytest.approx(sum(_rate(runs, 3) for runs in copies))
    assert ceiling["vs_ideal"] == pytest.approx(ceiling["tokens_per_s"] / (2 * report["points"][0]["tokens_per_s"]))
    assert report["points"][1]["vs_host_ceiling"] == pytest.approx(
        report["points"][1]["tokens_per_s"] / ceiling["tokens_per_s"])
    assert out.stdout.index("[2/2, round 1/2]") < out.stdout.index("host ceiling: 2 copies of dp1") < order[2]
    assert "| 2 | " in (tmp_path / "report.md").read_text().partition("Host ceiling")[2]


def test_scaling_model_for_crystal_7b_by_hand():
    from megacrystal.bench.scaling import Cluster, predict
    from megacrystal.config import load_config

    config = load_config(ROOT / "configs" / "crystal-7b.yaml")  # tp 2 x pp 4, sp, bf16, mbs 1, batch 2112
    cluster = Cluster(nodes=16, devices_per_node=8, peak_tflops=989.0, intra_node_gbps=3600, inter_node_gbps=400)
    got = predict(config, cluster)
    tokens = 2112 * 2048
    assert got.compute_s == pytest.approx(42_661_576_704 * tokens / (128 * 989e12 * 0.5))
    microbatches = 2112 // 16  # per data-parallel rank
    assert got.bubble_s == pytest.approx(got.compute_s * 3 / microbatches)
    per_device_network = 400e9 / 8 / 8  # bytes/s: a node's 400 Gb/s shared by 8 GPUs
    # distributed optimizer: reduce-scatter of this rank's 1/(tp x pp) share of fp32 gradients, then all-gather
    # of its bf16 parameters; each moves 15/16 of the buffer through every one of the 16 data-parallel ranks
    share = 6_575_278_720 / 8
    assert got.dp_bytes == pytest.approx(15 / 16 * share * (4 + 2))
    assert got.dp_s == pytest.approx(15 / 16 * share * (4 + 2) / per_device_network)
    activation = 2048 * 4096 * 2  # one sequence of bf16 activations
    assert got.tp_s == pytest.approx(microbatches * 8 * 4 * (2 * 1 / 2) * activation / (3600e9 / 8))
    assert got.pp_s == pytest.approx(microbatches * 2 * activation / 2 / per_device_network)
    faster = predict(config, Cluster(16, 8, 989.0, 3600, 3200))
    assert faster.dp_s < got.dp_s and faster.compute_s == got.compute_s


def test_data_config_needs_indexed_datasets(synthetic_config):
    from megacrystal.bench.sweep import BenchLR, data_phase
    from megacrystal.config import load_config

    with pytest.raises(ConfigError, match="--data config: the config has no indexed datasets"):
        data_phase(load_config(synthetic_config), 10, BenchLR(1e-3, 0))


def test_points_warm_up_like_the_configs_first_lr_segment_then_hold_its_peak(synthetic_config):
    from megacrystal.bench.sweep import BenchLR, data_phase, overrides_for
    from megacrystal.config import load_config

    tiny = load_config(ROOT / "configs" / "crystal-tiny.yaml")  # phases: the first warms up 15 steps to 0.01
    assert BenchLR.of(tiny) == BenchLR(0.01, 15)
    assert BenchLR.of(load_config(synthetic_config)) == BenchLR(0.01, 2)  # no phases: optim's segment
    lr = BenchLR(0.004, 3)
    assert data_phase(tiny, 20, lr)["lr"] == {"peak": 0.004, "warmup_steps": 3, "end": 0.004}
    point = plan_points(parse_sweep("tp=1"))[0]
    sets = overrides_for(point, 20, lr)[1::2]
    assert {"optim.lr=0.004", "optim.warmup_steps=3", "optim.end_lr=0.004"} <= set(sets)


@pytest.mark.slow
def test_points_on_the_configs_own_datasets_and_bf16_against_fp32(tiny_data, tmp_path):
    out = subprocess.run([sys.executable, "-m", "megacrystal", "bench", "--config", str(ROOT / "configs" /
                          "crystal-tiny.yaml"), *tiny_data, "--set", "train.threads=1", "--data", "config",
                          "--sweep", "precision=fp32,bf16", "--steps", "6", "--warmup", "2", "--no-baseline",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    mixed = {"prose": 0.5, "python": 0.3, "web": 0.2}  # the tiny config's widest phase, with FIM 0.9
    assert report["data"]["bench"]["weights"] == mixed and report["data"]["bench"]["fim_rate"] == 0.9
    data_dir = Path(tiny_data[1].partition("=")[2])
    assert report["data"]["train_tokens_sha256"] == {
        name: hashlib.sha256((data_dir / f"{name}-00000_train.bin").read_bytes()).hexdigest() for name in mixed}
    for point in report["points"]:
        records = [json.loads(line) for line in
                   (tmp_path / "points" / point["name"] / "metrics.jsonl").read_text().splitlines()]
        assert [r["phase"] for r in records] == ["bench"] * 6
        assert set().union(*(r["samples"] for r in records)) == set(mixed)  # read from every dataset
        assert 0 < point["measured"]["data_and_log_share"] < 1
        # the tiny config's first LR segment: warmup from 0 over 15 steps to 0.01, so all 6 steps ramp
        assert [r["lr"] for r in records] == pytest.approx([0.01 * step / 15 for step in range(6)])
        # the loss compared: the mean over the last steps (all 6 here)
        assert point["measured"]["loss_tail_steps"] == 6
        assert point["measured"]["loss_tail_mean"] == pytest.approx(sum(r["loss"] for r in records) / 6)
    md = (tmp_path / "report.md").read_text()
    assert "Data: the config's indexed datasets" in md and "| precisionbf16 / precisionfp32 |" in md
    assert "LR: warmup from 0 over 15 steps to 0.01, then held" in md and "mean of the last 6 steps" in md


def test_bf16_table_pairs_points_that_differ_in_precision_and_compile_only():
    from megacrystal.bench.report import _precision_lines

    def row(precision, compiled, tp, tokens_per_s, loss):
        return {"name": f"{precision}_{compiled}_tp{tp}", "tokens_per_s": tokens_per_s,
                "measured": {"loss_tail_mean": loss, "loss_tail_steps": 10},
                "settings": {"precision": precision, "compile": compiled, "tp": tp}}

    rows = [row("fp32", False, 1, 100.0, 5.0), row("fp32", True, 1, 110.0, 5.02), row("bf16", True, 1, 300.0, 5.05),
            row("fp32", False, 2, 50.0, 5.0)]  # tp 2 has no bf16 twin
    lines = _precision_lines(rows)
    assert [line for line in lines if line.startswith("| bf16")] == [
        "| bf16_True_tp1 / fp32_False_tp1 | 3.00x | 5.0500 / 5.0000 (+1.00%) |",
        "| bf16_True_tp1 / fp32_True_tp1 | 2.73x | 5.0500 / 5.0200 (+0.60%) |"]
    assert "mean of the last 10 steps" in lines[1]
    # the noise floor: the same precision, compiled against eager
    assert lines[-1] == ("The same loss where only torch.compile differs (rounding alone): "
                         "fp32_True_tp1 / fp32_False_tp1 5.0200 / 5.0000 (+0.40%).")
