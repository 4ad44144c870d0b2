"""One training step: the compute, pipeline, communication and optimizer terms added up, with what overlap
hides taken out, and the memory that decides whether the layout fits."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .comm import buckets, dp_seconds, pp_transfer_seconds, tp_layer_seconds
from .compute import layer_time, optimizer_seconds, output_layer_time
from .hardware import Cluster, Constants
from .memory import Memory, memory, stage_parameters
from .pipeline import schedule
from .shapes import Layout, Shape


@dataclass(frozen=True)
class Estimate:
    """Predicted seconds of one step by term; `step_s` is their sum."""

    compute_s: float  # GEMMs, attention and element-wise work of every micro-batch on the slowest stage
    tp_s: float  # exposed TP/SP collectives
    bubble_s: float
    pp_s: float  # exposed pipeline sends
    dp_s: float  # exposed gradient reduction and parameter gather
    optimizer_s: float
    other_s: float  # compute lost beside overlapped communication, and the per-step overhead
    tokens: int
    flops_per_token: float
    devices: int
    peak_tflops: float
    memory: Memory
    # compute_s split: the layers' GEMMs, attention core and element-wise work, and the output layer with its loss
    gemm_s: float = 0.0
    attention_s: float = 0.0
    elementwise_s: float = 0.0
    output_layer_s: float = 0.0

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_s + self.bubble_s + self.pp_s + self.dp_s + self.optimizer_s + self.other_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def tflops_per_device(self) -> float:
        """Model TFLOP/s per device (recomputation not counted)."""
        return self.flops_per_token * self.tokens_per_s / self.devices / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_device / self.peak_tflops

    def breakdown(self) -> dict:
        """The terms in seconds, plus step, tokens/s, MFU and memory in GB."""
        terms = {k: v for k, v in asdict(self).items() if k.endswith("_s") and not isinstance(v, dict)}
        return {**terms, "step_s": self.step_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "memory_gb": self.memory.as_gb(), "fits": self.memory.fits}


def estimate(shape: Shape, layout: Layout, cluster: Cluster, c: Constants) -> Estimate:
    """The predicted step of `layout` for `shape` on `cluster` with constants `c`."""
    dev = cluster.device
    m = layout.microbatches
    layers = shape.layers / layout.pp  # per stage (uneven splits cost the ceiling; validity is checked by search)
    lt = layer_time(shape, layout, dev, c)
    tp_fwd, tp_bwd = tp_layer_seconds(shape, layout, cluster, c)
    middle = layers * (lt.fwd + lt.bwd + tp_fwd + tp_bwd)
    out_fwd, out_bwd = output_layer_time(shape, layout, dev, c)
    stages = [middle] * max(layout.pp - 1, 0) + [middle + out_fwd + out_bwd]
    pipe = schedule(m, layout.pp, layout.vpp, stages, overlap_p2p=bool(layout.vpp))
    pp = pipe.transfers * pp_transfer_seconds(shape, layout, cluster, c)

    params = stage_parameters(shape, layout)
    grad_s, gather_s = dp_seconds(params, shape, layout, cluster, c)
    n_buckets = buckets(params, layout.dp)
    # Overlap: the last micro-batch's backward hides the gradient buckets reduced while it runs, the first
    # micro-batch's forward the parameter all-gather; the last bucket (and any excess) stays exposed.
    hidden = 0.0
    if layout.overlap_grad_reduce and grad_s:
        exposed = max(grad_s - stages[0] * 2 / 3, grad_s / n_buckets)
        hidden += grad_s - exposed
        grad_s = exposed
    if layout.overlap_param_gather and gather_s:
        exposed = max(gather_s - stages[0] / 3, gather_s / n_buckets)
        hidden += gather_s - exposed
        gather_s = exposed
    local = params / layout.dp if (layout.distributed_optimizer or layout.zero_stage) else params
    optimizer = optimizer_seconds(local, shape.bytes_per_value, dev, c)

    compute = m * (max(stages) - layers * (tp_fwd + tp_bwd))  # the slowest stage's work, less its TP time
    output = m * (out_fwd + out_bwd) if stages[-1] == max(stages) else 0.0
    return Estimate(
        compute_s=compute, tp_s=m * layers * (tp_fwd + tp_bwd), bubble_s=pipe.bubble_s, pp_s=pp,
        dp_s=grad_s + gather_s, optimizer_s=optimizer, other_s=c.overlap_slowdown * hidden + c.step_overhead_s,
        tokens=layout.global_batch * shape.seq, flops_per_token=shape.model_flops_per_token(),
        devices=layout.tp * layout.pp * layout.dp, peak_tflops=dev.peak_tflops,
        memory=memory(shape, layout, dev.memory_gb),
        gemm_s=m * layers * (lt.gemm_fwd + lt.gemm_bwd), attention_s=m * layers * (lt.attention_fwd + lt.attention_bwd),
        elementwise_s=m * layers * (lt.elementwise_fwd + lt.elementwise_bwd), output_layer_s=output)
