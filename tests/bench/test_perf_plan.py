"""`bench --plan` / `--predict` on the command line, and the model against the published runs of
docs/benchmarks/throughput-validation.md (the table's predictions must not drift)."""
import json
from pathlib import Path

import pytest

from megacrystal.bench.perf.hardware import Cluster, default_constants, device
from megacrystal.bench.perf.shapes import Layout, Shape
from megacrystal.bench.perf.step import estimate
from megacrystal.bench.perf.validation import published_rows, validate
from megacrystal.cli import main
from megacrystal.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SEVEN_B = str(ROOT / "configs" / "crystal-7b.yaml")
TABLE = ROOT / "docs" / "benchmarks" / "throughput-validation.json"


def _plan(capsys, *extra):
    code = main(["bench", "--config", SEVEN_B, "--plan", "--nodes", "16", "--devices-per-node", "8",
                 "--device", "H100 SXM", "--top", "50", *extra])
    return code, capsys.readouterr()


def test_plan_for_crystal_7b_on_16x8_h100(capsys, tmp_path):
    out_file = tmp_path / "plan.txt"
    code, out = _plan(capsys, "--out", str(out_file))
    assert code == 0, out.err
    rows = [line for line in out.out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 50
    assert all(float(line.split()[-1]) <= 80 for line in rows)  # memory column: every listed layout fits
    sets = out_file.read_text().split()
    assert sets[0] == "--set" and "parallel.tp=2" in sets and "engine=megatron" in sets
    assert "megacrystal launch slurm --config" in out.out
    chosen = load_config(SEVEN_B, sets[1::2])  # the written overrides are a valid config for 128 GPUs
    assert chosen.parallel.tp == 2 and chosen.data_parallel_size(128) == 128 // (2 * chosen.parallel.pp)
    # the best is no slower, in this model, than the layouts published for 7B-class Megatron runs on this
    # cluster: tp 2 x pp 1 (Megatron-LM README, 7.1B on H100), tp 4 x pp 1 (Narayanan et al. 2021, 7.5B),
    # and the config's own tp 2 x pp 4
    config = load_config(SEVEN_B)
    shape = Shape.of(config.model)
    cluster = Cluster(device("H100 SXM"), 16, 8, 450, 400)
    c = default_constants("H100 SXM")
    best_tokens = float(rows[0].split()[-3].replace(",", ""))
    for tp, pp in ((2, 1), (4, 1), (2, 4)):
        published = [estimate(shape, Layout(tp, pp, 128 // (tp * pp), mbs, 2112, sp=True,
                                            overlap_param_gather=False), cluster, c)
                     for mbs in (1, 2, 3) if 2112 % (mbs * 128 // (tp * pp)) == 0]
        assert best_tokens >= max(e.tokens_per_s for e in published if e.memory.fits) * 0.999


def test_predict_prints_the_breakdown_and_memory(capsys):
    assert main(["bench", "--config", SEVEN_B, "--predict", "--nodes", "16", "--inter-node-gbps-per-node",
                 "3200"]) == 0
    out = capsys.readouterr().out
    assert "400 Gb/s per GPU between nodes" in out and "pipeline bubble" in out and "memory per device" in out


def test_deprecated_link_flag_is_per_node_with_a_warning(capsys):
    assert main(["bench", "--config", SEVEN_B, "--predict", "--nodes", "16", "--inter-node-gbps", "800"]) == 0
    out = capsys.readouterr()
    assert "--inter-node-gbps is deprecated" in out.err and "100 Gb/s per GPU between nodes" in out.out


@pytest.mark.parametrize("flag,value", [("--nodes", "0"), ("--nodes", "-2"), ("--nodes", "two"), ("--top", "1.5"),
                                        ("--inter-node-gbps-per-gpu", "0"), ("--efficiency", "nan"),
                                        ("--intra-node-gbps-per-gpu", "fast")])
def test_bad_numbers_are_one_line_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as exited:  # argparse refuses them (megacrystal.config.arguments)
        main(["bench", "--config", SEVEN_B, "--plan", flag, value])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and f"argument {flag}: " in err, err


def test_unknown_device_and_recompute_are_one_line_errors(capsys):
    assert main(["bench", "--config", SEVEN_B, "--plan", "--device", "TPU"]) != 0
    assert "--device 'TPU'" in capsys.readouterr().err
    assert main(["bench", "--config", SEVEN_B, "--plan", "--recompute", "some"]) != 0
    assert "--recompute 'some'" in capsys.readouterr().err


def test_published_runs_within_the_acceptance_and_without_drift():
    rows = published_rows()
    assert len(rows) >= 8 and all(r["source"] and r["published"] > 0 for r in rows)
    result = validate()
    assert result["median_abs_error"] <= 0.15 and result["max_abs_error"] <= 0.30
    assert len(result["rows"]) == len(rows)  # none dropped
    stored = {r["id"]: r for r in json.loads(TABLE.read_text())["rows"]}
    for r in result["rows"]:
        assert r["predicted"] == pytest.approx(stored[r["id"]]["predicted"], rel=0.005), r["id"]
        assert r["fits"]
