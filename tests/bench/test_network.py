"""The scaling model's data-parallel volume and link framing by hand, the link-rates report section, and (slow)
`megacrystal bench --link-rates` on two real network-namespace hosts with a `tc tbf`-throttled veth."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megacrystal.bench.network import parse_rates
from megacrystal.bench.report import add_network_section, network_markdown
from megacrystal.bench.scaling import Cluster, dp_bytes_per_rank, predict, tcp_payload_fraction
from megacrystal.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "crystal-tiny.yaml"
# crystal-tiny by hand: per layer QKV 128x384 + 384, projection 128x128 + 128, SwiGLU 2 x (128x344 + 344) and
# 344x128 + 128, two LayerNorms 2 x 2 x 128; then the tied 2048 x 128 embedding and the final LayerNorm.
TINY_PARAMS = 4 * (128 * 384 + 384 + 128 * 128 + 128 + 2 * (128 * 344 + 344) + 344 * 128 + 128 + 4 * 128) \
    + 2048 * 128 + 2 * 128


def test_tcp_framing_by_hand():
    # 1500-byte MTU: 1448 payload (minus IPv4 20, TCP 20 + timestamps 12) in a 1514-byte frame (+ Ethernet 14),
    # and one 66-byte header-only ACK per two segments of the data coming the other way.
    assert tcp_payload_fraction() == pytest.approx(1448 / (1514 + 66 / 2))
    assert tcp_payload_fraction(9000, segments_per_ack=1) == pytest.approx(8948 / (9014 + 66))


def test_dp_volume_of_the_tiny_model_by_hand():
    config = load_config(TINY)  # fp32, no distributed optimizer: one fp32 all-reduce of every gradient
    assert TINY_PARAMS == 1_060_288
    assert dp_bytes_per_rank(config, 1) == 0
    # ring over 2 ranks: reduce-scatter sends half the buffer, all-gather the other half
    assert dp_bytes_per_rank(config, 2) == pytest.approx(TINY_PARAMS * 4)
    assert dp_bytes_per_rank(config, 4) == pytest.approx(2 * 3 / 4 * TINY_PARAMS * 4)
    # distributed optimizer: fp32 reduce-scatter + all-gather of the parameters in their own dtype
    distopt = load_config(TINY, ["parallel.distributed_optimizer=true"])
    assert dp_bytes_per_rank(distopt, 2) == pytest.approx(1 / 2 * TINY_PARAMS * (4 + 4))
    bf16 = load_config(TINY, ["parallel.distributed_optimizer=true", "train.precision=bf16"])
    assert dp_bytes_per_rank(bf16, 2) == pytest.approx(1 / 2 * TINY_PARAMS * (4 + 2))


def test_two_hosts_on_a_throttled_link_by_hand():
    config = load_config(TINY)
    cluster = Cluster(nodes=2, devices_per_node=1, peak_tflops=0.15, intra_node_gbps=1, inter_node_gbps=0.05,
                      efficiency=0.3, inter_node_payload_fraction=tcp_payload_fraction())
    got = predict(config, cluster)
    tokens = 16 * 128
    flops_per_token = 6 * 4 * (4 * 128 * 128 + 3 * 128 * 344) + 6 * 2048 * 128 + 12 * 4 * 128 * 128
    assert got.compute_s == pytest.approx(flops_per_token * tokens / (2 * 0.15e12 * 0.3))
    payload_per_s = 50e6 / 8 * 1448 / 1547  # 50 Mbit/s of layer-2 bits, 1448 of every 1547 bytes payload
    assert got.dp_s == pytest.approx(TINY_PARAMS * 4 / payload_per_s)
    assert got.step_s == pytest.approx(got.compute_s + got.dp_s)
    assert got.bubble_s == got.tp_s == got.pp_s == 0
    # the raw link (framing ignored, the default) is faster by exactly the framing
    raw = predict(config, Cluster(2, 1, 0.15, 1, 0.05, 0.3))
    assert raw.dp_s == pytest.approx(got.dp_s * 1448 / 1547)


@pytest.mark.parametrize("text", ["", "fast", "50,-1", "0"])
def test_bad_link_rates_are_one_line_errors(text):
    with pytest.raises(ConfigError, match="--link-rates"):
        parse_rates(text)


def _network_json(errors=(0.05, -0.1)) -> dict:
    step = {"step_time_s": 1.0, "step_time_p10_s": 0.9, "step_time_p90_s": 1.1}
    predicted = {"compute_s": 0.1, "dp_s": 0.9, "step_s": 1.0, "dp_bytes": 4e6, "wire_bytes": 4.3e6}
    return {"config": "c.yaml", "steps": 20, "warmup": 5, "precision": "fp32", "tolerance": 0.25,
            "tbf": {"burst_bytes": 65536, "queue_ms": 400}, "tcp_payload_fraction": 0.936,
            "calibration": {"dp1": step, "peak_tflops_1_thread": 0.15, "efficiency": 0.3},
            "unthrottled": {"predicted": {**predicted, "dp_s": None, "step_s": 0.1}, "measured": step},
            "rates": [{"mbit": 20 * (i + 1), "predicted": predicted, "error": e,
                       "measured": {**step, "wire_bytes_per_step": [4.2e6, 4.2e6]}} for i, e in enumerate(errors)],
            "max_abs_error": max(abs(e) for e in errors), "within_tolerance": True}


def test_report_gets_the_link_section_once(tmp_path):
    add_network_section(tmp_path)  # no network.json: nothing happens
    assert not (tmp_path / "report.md").exists()
    (tmp_path / "report.md").write_text("# sweep report\n\n| point |\n")
    (tmp_path / "report.json").write_text(json.dumps({"points": [1]}))
    (tmp_path / "network.json").write_text(json.dumps(_network_json()))
    add_network_section(tmp_path)
    add_network_section(tmp_path)  # again (a re-run): replaced, not appended twice
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# sweep report") and text.count("## Scaling model against a throttled link") == 1
    assert "| 20 Mbit/s | 0.100 | 0.900 | 1.000 | 0.900 / **1.000** / 1.100 | +5.0% | 4.300 / 4.200 / 4.200 |" in text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["points"] == [1] and report["network"]["rates"][1]["error"] == -0.1
    assert network_markdown(_network_json()) in text


def _namespaces_or_skip() -> None:
    from megacrystal.launch.netns import NetnsUnavailable, set_rate, two_hosts

    try:
        with two_hosts() as hosts:
            set_rate(hosts, 10)
    except NetnsUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_link_rates_on_two_namespace_hosts(synthetic_config, tmp_path):
    """The small synthetic model (~80k parameters, ~0.33 MB of gradients on the wire a step) at 5 and 200 Mbit/s:
    about 0.55 s against 0.015 s of communication per step, so the slow link must give a much longer step."""
    _namespaces_or_skip()
    bench = subprocess.Popen([sys.executable, "-m", "megacrystal", "bench", "--config", str(synthetic_config),
                              "--link-rates", "5,200", "--steps", "6", "--warmup", "2", "--out", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stdout, stderr = bench.communicate(timeout=400)
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "[4/4] DP=2 across the two hosts, link 200 Mbit/s" in stdout  # progress lines
    network = json.loads((tmp_path / "network.json").read_text())
    slow, fast = (row["measured"] for row in network["rates"])
    assert slow["steps_timed"] == fast["steps_timed"] == 4
    assert slow["step_time_s"] > 4 * fast["step_time_s"], (slow["step_time_s"], fast["step_time_s"])
    # tbf counted about the model's bytes each way (ACKs vary a little with timing); on the slow link only, where
    # a step (~0.5 s) is long against the poll that reads the counters
    for sent in network["rates"][0]["measured"]["wire_bytes_per_step"]:
        assert 0.8 < sent / network["rates"][0]["predicted"]["wire_bytes"] < 1.2
    assert 0 < network["calibration"]["efficiency"] < 1
    assert "## Scaling model against a throttled link" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["network"]["rates"][0]["mbit"] == 5
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"mc{bench.pid % 100000}a" not in listed, listed  # the bench removed its namespaces (netns.two_hosts)
