"""`bench --calibrate`: the fit recovers constants that generated the step times, and on this machine's CPU
sweeps (docs/benchmarks/bench-tiny) the calibrated model is within 20% (median) of the measured steps."""
import json
from pathlib import Path

import pytest

from megacrystal.bench.perf.calibrate import errors, fit, load_points, problem
from megacrystal.bench.perf.hardware import Constants, load_constants
from megacrystal.bench.perf.step import estimate
from megacrystal.cli import main
from megacrystal.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ROOT / "docs" / "benchmarks" / "bench-tiny"


def test_fit_recovers_the_step_times_of_known_constants():
    points = load_points(TINY_RUN)
    truth = Constants(gemm_max=0.4, attention_efficiency=0.2, hbm_efficiency=0.5, intra_link_efficiency=0.3,
                      step_overhead_s=0.02, collective_latency_s=1e-4)
    for p in points:  # replace the measurements by what the true constants predict
        p["measured_s"] = estimate(*problem(p), truth).step_s
    fitted = fit(points)
    assert max(abs(e) for e in errors(points, fitted)) < 0.05  # a coordinate search: close, not exact
    assert max(abs(e) for e in errors(points, Constants())) > 0.2  # the defaults were far off


def test_calibrate_the_cpu_sweep_and_predict_with_it(tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert main(["bench", "--config", str(ROOT / "configs" / "crystal-tiny.yaml"), "--calibrate", str(TINY_RUN),
                 "--calibration", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dp2_tp2_pp2" in printed and "median |error|" in printed
    saved = json.loads(out.read_text())
    assert len(saved["points"]) == 8 and saved["median_abs_error"] <= 0.20
    assert load_constants(str(out)).source.startswith("calibrated on")
    assert main(["bench", "--config", str(ROOT / "configs" / "crystal-tiny.yaml"), "--predict",
                 "--devices-per-node", "2", "--calibration", str(out)]) == 0
    assert "constants: calibrated on" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no readable report.json"):
        load_points(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="--calibration"):
        load_constants(str(tmp_path / "x.json"))
