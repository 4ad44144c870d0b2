"""`bench --predict` and `bench --plan` output: the step-time breakdown of a layout, the ranked layouts, and the
chosen one as `--set` overrides for `megacrystal launch slurm`."""
from __future__ import annotations

from .shapes import Layout
from .step import Estimate

TERMS = (("compute", "compute_s"), ("  GEMMs", "gemm_s"), ("  attention", "attention_s"),
         ("  element-wise", "elementwise_s"), ("  output layer", "output_layer_s"), ("TP/SP comm", "tp_s"),
         ("pipeline bubble", "bubble_s"), ("PP sends", "pp_s"), ("DP comm (exposed)", "dp_s"),
         ("optimizer", "optimizer_s"), ("other", "other_s"))


def breakdown_lines(est: Estimate) -> list[str]:
    """The step's terms, its total, tokens/s, MFU and memory, one per line."""
    b = est.breakdown()
    lines = [f"  {name:20s} {b[key]:9.3f} s" for name, key in TERMS]
    mem = est.memory.as_gb()
    lines.append(f"  step {est.step_s:.3f} s -> {est.tokens_per_s:,.0f} tokens/s, {est.tflops_per_device:.0f} "
                 f"TFLOP/s per device, MFU {100 * est.mfu:.1f}%")
    lines.append(f"  memory per device {mem['total']:.1f} GB of {mem['capacity']:.1f} usable (weights "
                 f"{mem['weights']:.1f}, gradients {mem['gradients']:.1f}, optimizer {mem['optimizer']:.1f}, "
                 f"activations {mem['activations']:.1f}){'' if est.memory.fits else '  DOES NOT FIT'}")
    return lines


def overrides(layout: Layout) -> list[str]:
    """The layout as megacrystal config overrides (KEY=VALUE for --set)."""
    sets = [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}",
            f"parallel.vpp={layout.vpp if layout.vpp else 'null'}",
            f"parallel.sp={'true' if layout.sp and layout.tp > 1 else 'false'}",
            f"train.micro_batch_size={layout.micro_batch}"]
    if layout.zero_stage:
        sets += ["engine=deepspeed", f"deepspeed.zero_stage={layout.zero_stage}",
                 "parallel.distributed_optimizer=false"]
    else:
        sets += ["engine=megatron",
                 f"parallel.distributed_optimizer={'true' if layout.distributed_optimizer else 'false'}"]
    return sets


def table(ranked: list[tuple[Layout, Estimate]], top: int) -> list[str]:
    """The first `top` layouts that fit: rank, layout, step, tokens/s, MFU, memory."""
    lines = [f"{'#':>3} {'layout':70s} {'step s':>8} {'tokens/s':>12} {'MFU':>6} {'mem GB':>7}"]
    for i, (layout, est) in enumerate([le for le in ranked if le[1].memory.fits][:top], 1):
        lines.append(f"{i:>3} {layout.describe():70s} {est.step_s:8.3f} {est.tokens_per_s:12,.0f} "
                     f"{100 * est.mfu:5.1f}% {est.memory.total / 1e9:7.1f}")
    return lines
