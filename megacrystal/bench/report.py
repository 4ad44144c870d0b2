"""Turn measured sweep points into report.json, report.md and plots (throughput vs devices, MFU per point)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from .ceiling import markdown as ceiling_lines
from .sweep import reference_row


def environment(peaks: dict) -> dict:
    """What the numbers stand on: hardware, software, the peak used for MFU and the network behind them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu}",
        "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "peak_tflops_per_device": peaks,
        "network": "one host: ranks talk over loopback (gloo)" if not torch.cuda.is_available() else "one host",
    }


def command_line() -> str:
    """The bench command as the user would type it (argv[0] is a machine-specific script path)."""
    return shlex.join(["megacrystal", *sys.argv[1:]])


def summarize(points: list[dict], flops_per_token: float, peak_for) -> list[dict]:
    """Add tokens/s per device, TFLOP/s per device, MFU and scaling efficiency to each point's measurements."""
    base = min(points, key=lambda p: p["world_size"])  # the first of the smallest points, in sweep order
    base_rate = base["measured"]["tokens_per_s"] / base["world_size"]
    rows = []
    for p in points:
        m = p["measured"]
        per_device = m["tokens_per_s"] / p["world_size"]
        tflops = flops_per_token * per_device / 1e12
        peak = peak_for(p)
        cores = os.cpu_count() or 1
        rows.append({**p, "tokens_per_s": m["tokens_per_s"], "tokens_per_s_per_device": per_device,
                     "oversubscribed": not torch.cuda.is_available() and p["world_size"] > cores,
                     "tflops_per_device": tflops, "peak_tflops_per_device": peak,
                     "mfu": tflops / peak if peak else None,
                     "scaling_efficiency": per_device / base_rate, "baseline_point": base["name"]})
    return rows


def _describe_data(data) -> str:
    if data == "synthetic":
        return "the synthetic token stream (no files, no phases)"
    phase, digests = data["bench"], data.get("train_tokens_sha256", {})
    tokens = ", ".join(f"{name} {digest[:12]}" for name, digest in digests.items())
    return (f"the config's indexed datasets, blend {phase['weights']}, FIM rate {phase['fim_rate']} "
            f"(`--data config`){f'; sha256 of their train tokens: {tokens}' if tokens else ''}")


def _lr_text(lr: dict | None) -> str:
    if not lr:
        return ""
    return (f" LR: warmup from 0 over {lr['warmup_steps']} steps to {lr['peak']:g}, then held (the config's first "
            "LR segment without its decay).")


def _loss_change(row: dict, reference: dict) -> str:
    loss, ref = row["measured"]["loss_tail_mean"], reference["measured"]["loss_tail_mean"]
    return f"{loss:.4f} / {ref:.4f} ({100 * (loss / ref - 1):+.2f}%)"


def _precision_lines(rows: list[dict]) -> list[str]:
    """bf16 against fp32 for points that differ only in precision (and in torch.compile, which a user picks per
    precision): speed-up and the training loss at the end, as the mean over the last steps (the same batches in
    every point; one step's loss moves by several % from batch to batch). Points that differ in torch.compile
    only show how far a change of rounding alone moves that loss."""
    lines, rounding = [], []
    for bf16 in (r for r in rows if r["settings"].get("precision") == "bf16"):
        twin = _without(bf16["settings"], "precision", "compile")
        for fp32 in (r for r in rows if r["settings"].get("precision") == "fp32"
                     and _without(r["settings"], "precision", "compile") == twin):
            speedup = bf16["tokens_per_s"] / fp32["tokens_per_s"]
            lines.append(f"| {bf16['name']} / {fp32['name']} | {speedup:.2f}x | {_loss_change(bf16, fp32)} |")
    for compiled in (r for r in rows if r["settings"].get("compile") is True):
        for eager in (r for r in rows if r["settings"].get("compile") is False
                      and _without(r["settings"], "compile") == _without(compiled["settings"], "compile")):
            rounding.append(f"{compiled['name']} / {eager['name']} {_loss_change(compiled, eager)}")
    if not lines:
        return []
    steps = rows[0]["measured"]["loss_tail_steps"]
    text = ["", f"bf16 against fp32 (tokens/s ratio; training loss, mean of the last {steps} steps):", "",
            "| points | bf16 / fp32 tokens/s | loss bf16 / fp32 |", "|---|---|---|", *lines]
    if rounding:
        text += ["", "The same loss where only torch.compile differs (rounding alone): " + "; ".join(rounding) + "."]
    return text


def _without(settings: dict, *keys: str) -> dict:
    return {key: value for key, value in settings.items() if key not in keys}


def _rounds_text(repeat: int) -> str:
    if repeat == 1:
        return ""
    return (f" The sweep ran {repeat} times, every point once per round, and each point's timed steps of all "
            "rounds are pooled: a drift of the host's speed moves all points alike.")


def write_report(out: Path, rows: list[dict], env: dict, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"environment": env, **meta, "points": rows}, indent=1))
    lines = [f"# megacrystal bench: {meta['config']}", "",
             f"Device: {env['device']} ({env['cores']} cores); torch {env['torch']}; network: {env['network']}.",
             f"FLOPs per token: {meta['flops_per_token']:.4g} (6N matmuls + tied head once + 12 L h S attention). "
             f"Steps: {meta['steps']} per point, the first {meta['warmup']} not timed; step time is the median "
             f"(p10-p90 shown).{_rounds_text(meta.get('repeat', 1))}", "",
             f"Data: {_describe_data(meta.get('data', 'synthetic'))}.{_lr_text(meta.get('lr'))}", "",
             "| point | devices | step s (p10-p90) | tokens/s | tokens/s/device | TFLOP/s/device | peak | MFU | "
             "scaling eff. | peak mem MB | data+log | first step s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["measured"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_tflops_per_device']:.3f}" if r["peak_tflops_per_device"] else "n/a"
        name = f"{r['name']}{' (oversubscribed)' if r['oversubscribed'] else ''}"
        lines.append(f"| {name} | {r['world_size']} | {m['step_time_s']:.3f} ({m['step_time_p10_s']:.3f}-"
                     f"{m['step_time_p90_s']:.3f}) | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
                     f"{r['tflops_per_device']:.4f} | {peak} | {mfu} | {r['scaling_efficiency']:.2f} | "
                     f"{m['memory_mb'] or 0:,.0f} | {100 * m.get('data_and_log_share', 0.0):.1f}% | "
                     f"{m.get('first_step_s', float('nan')):.1f} |")
    lines += ["", f"Scaling efficiency = (tokens/s per device) / (that of {rows[0]['baseline_point']}, the smallest "
              "point). MFU uses dense peaks; on a CPU the peak is a measured matmul rate at the point's threads "
              "per rank; 'oversubscribed' marks points with more ranks than cores, whose numbers say little. "
              "data+log: median data loading plus metrics/progress writing as a share of a step. first step: "
              "warm-up, including torch.compile's compile time (or its on-disk cache load) for compile=true points."]
    if meta.get("repeat", 1) > 1:
        lines += ["", "Median step time of each round, s: " + "; ".join(
            f"{r['name']} " + ", ".join(f"{t:.3f}" for t in r["measured"]["round_step_times_s"]) for r in rows) + "."]
    lines += _precision_lines(rows)
    lines += ceiling_lines(rows, meta.get("host_ceiling") or {})
    if meta.get("baselines"):
        lines += ["", "Plain-PyTorch eager baseline (the same model math, `bench/baseline.py`), one process:", "",
                  "| baseline | step s | tokens/s | our 1-process point | ours / baseline step time |",
                  "|---|---|---|---|---|"]
        for key, b in meta["baselines"].items():
            for r in (r for r in rows if r.get("baseline") == key):
                lines.append(f"| {key} | {b['step_time_s']:.3f} | {b['tokens_per_s']:,.0f} | {r['name']} | "
                             f"{r['step_time_vs_baseline']:.2f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    add_network_section(out)  # a `bench --link-rates` run into the same directory keeps its section
    return [out / "report.json", out / "report.md", *_plots(out, rows, meta.get("host_ceiling") or {})]


# --- `bench --link-rates` (bench/network.py) ----------------------------------------------------------------
_NETWORK_BEGIN, _NETWORK_END = "<!-- link-rates: begin -->", "<!-- link-rates: end -->"


def add_network_section(out: Path) -> None:
    """If `out` has network.json: append (or replace) the "Scaling model against a throttled link" section of
    report.md, and put network.json into report.json as "network". Either report file is made if missing."""
    path = out / "network.json"
    if not path.is_file():
        return
    network = json.loads(path.read_text())
    md = out / "report.md"
    text = md.read_text() if md.is_file() else f"# megacrystal bench: {network['config']}\n"
    if _NETWORK_BEGIN in text:  # an earlier copy: cut it out
        head, _, rest = text.partition(_NETWORK_BEGIN)
        text = head + rest.partition(_NETWORK_END)[2].lstrip("\n")
    md.write_text(f"{text.rstrip()}\n\n{_NETWORK_BEGIN}\n{network_markdown(network)}\n{_NETWORK_END}\n")
    summary = out / "report.json"
    data = json.loads(summary.read_text()) if summary.is_file() else {}
    summary.write_text(json.dumps({**data, "network": network}, indent=1))


def network_markdown(data: dict) -> str:
    """The `bench --link-rates` section: how compute was calibrated, and predicted against measured per link rate."""
    cal = data["calibration"]
    first = data["rates"][0]["predicted"]
    free = data["unthrottled"]
    lines = [
        "## Scaling model against a throttled link", "",
        f"DP=2 across two network-namespace hosts (one rank x 1 thread each, gloo over a veth pair) with `tc tbf` "
        f"limiting each direction, against `bench/scaling.py`. Compute was measured once: DP=1, 1 process x 1 "
        f"thread, {cal['dp1']['step_time_s']:.3f} s/step = {100 * cal['efficiency']:.1f}% of the measured 1-thread "
        f"{data['precision']} matmul peak ({cal['peak_tflops_1_thread'] * 1e3:.1f} GFLOP/s); DP=2 halves it. "
        f"Communication is predicted: each rank sends {first['dp_bytes'] / 1e6:.3f} MB per step (the ring "
        f"all-reduce of megatron's fp32 gradient buffer), {first['wire_bytes'] / 1e6:.3f} MB on the wire with "
        f"TCP/IPv4/Ethernet headers and ACKs (payload {100 * data['tcp_payload_fraction']:.1f}%), at the tbf rate "
        f"(layer-2 bits). Steps: {data['steps']} per run, the first {data['warmup']} not timed.", "",
        "| link, each way | predicted compute s | predicted DP comm s | predicted step s | measured step s "
        "(p10 / median / p90) | error | wire MB/step, model / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["rates"]:
        p, m = row["predicted"], row["measured"]
        wire = m.get("wire_bytes_per_step")
        measured_wire = " / ".join(f"{w / 1e6:.3f}" for w in wire) if wire else "n/a"
        lines.append(f"| {row['mbit']:g} Mbit/s | {p['compute_s']:.3f} | {p['dp_s']:.3f} | {p['step_s']:.3f} | "
                     f"{m['step_time_p10_s']:.3f} / **{m['step_time_s']:.3f}** / {m['step_time_p90_s']:.3f} | "
                     f"{100 * row['error']:+.1f}% | {p['wire_bytes'] / 1e6:.3f} / {measured_wire} |")
    fp, fm = free["predicted"], free["measured"]
    lines.append(f"| not throttled (reference) | {fp['compute_s']:.3f} | not modelled | {fp['step_s']:.3f} | "
                 f"{fm['step_time_p10_s']:.3f} / **{fm['step_time_s']:.3f}** / {fm['step_time_p90_s']:.3f} | "
                 f"{100 * (fp['step_s'] / fm['step_time_s'] - 1):+.1f}% | |")
    verdict = "within" if data["within_tolerance"] else "OUTSIDE"
    lines += ["", f"Error = predicted / measured - 1; largest |error| over the throttled rates "
              f"{100 * data['max_abs_error']:.1f}%, {verdict} the ±{100 * data['tolerance']:.0f}% target. Wire "
              "MB/step: what each host's tbf sent per timed step (both directions). The unthrottled row's excess "
              "over the predicted compute is what two busy processes and the veth at full speed add (the "
              "optimizer step, which DP does not split, among it). Slow links spread the steps upwards (p10 near "
              "the model): the all-reduce sends both ways at once over one TCP connection, and the senders now "
              "and then stall, probably as each direction's ACKs wait behind data in the other's tbf queue "
              "(checked by hand at 20 Mbit/s: a one-way gloo send of the same bytes takes the model's time every "
              "time; a bare two-way exchange or all-reduce of them spreads like the steps). tbf's "
              f"{data['tbf']['burst_bytes'] // 1024} KB bucket lets that much leave at once after each compute "
              "spell; the model leaves it out."]
    return "\n".join(lines)


def _plots(out: Path, rows: list[dict], ceilings: dict[int, dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    devices = [r["world_size"] for r in rows]
    ax.scatter(devices, [r["tokens_per_s"] for r in rows], label="measured")
    for r in rows:
        ax.annotate(r["name"], (r["world_size"], r["tokens_per_s"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    base = reference_row(rows)
    xs = sorted(set(devices))
    ax.plot(xs, [base["tokens_per_s_per_device"] * x for x in xs], linestyle="--", color="grey", label="ideal")
    if ceilings:
        ax.scatter(list(ceilings), [c["tokens_per_s"] for c in ceilings.values()], marker="x", color="black",
                   label="host ceiling (copies, no communication)")
    ax.set_xlabel("devices (ranks)")
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput against devices")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(rows)), [100 * (r["mfu"] or 0) for r in rows])
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("MFU %")
    ax.set_title("Model FLOPs utilisation per point")
    fig.tight_layout()
    fig.savefig(out / "mfu.png", dpi=110)
    plt.close(fig)
    return [out / "throughput.png", out / "mfu.png"]
