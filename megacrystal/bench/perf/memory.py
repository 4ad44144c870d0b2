"""Memory per device: weights, gradients, optimizer state and activations, so a layout that does not fit is
marked.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), section 4: per layer and micro-batch, s b h (34 + 5 a s / h) bytes without parallelism;
with tensor parallelism s b h (10 + 24 / t + 5 a s / (h t)); with sequence parallelism as well
s b h / t (34 + 5 a s / h); selective recomputation drops the 5 a s / h term; full recomputation keeps only the
2 s b h input of each layer. The first pipeline stage holds p micro-batches in flight under 1F1B, so L layers'
worth whatever p is (their section 4.2.3), times 1 + (p - 1) / (p v) when interleaved. The counts are written
per term below so they follow the shape (FFN width, SwiGLU, dropout, fused attention) instead of GPT's 4h.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .shapes import Layout, Shape

GB = 1e9
# CUDA context, NCCL buffers, workspace and allocator fragmentation: kept free of the model's bytes
RESERVED_BYTES = 4 * GB
USABLE_FRACTION = 0.92


def stage_parameters(shape: Shape, layout: Layout, first: bool = True) -> float:
    """Parameters one device of a pipeline stage holds: its layers' TP shard plus the (tied) embedding shard,
    which both the first and the last stage keep."""
    layers = math.ceil(shape.layers / layout.pp)
    per_layer = (shape.layer_weights() + 4 * shape.hidden) / layout.tp
    return layers * per_layer + shape.vocab * shape.hidden / layout.tp


def layer_activation_bytes(shape: Shape, layout: Layout, recompute: str | None = None) -> float:
    """Activation bytes one layer keeps for backward, per micro-batch, on one device (Korthikanti et al.)."""
    s, b, h, t, bv = shape.seq, layout.micro_batch, shape.hidden, layout.tp, shape.bytes_per_value
    recompute = recompute or layout.recompute
    sbh = s * b * h
    if recompute == "full":
        return bv * sbh / (t if layout.sp else 1)
    # replicated across TP ranks unless sequence-parallel: two norm inputs, the inputs of the QKV and first MLP
    # projections, and the two dropout masks (1 byte each): 10 s b h for GPT
    replicated = sbh * (4 * bv + (2 if shape.dropout else 0))
    # split by TP: Q, K, V and the output projection's input; the MLP's activation input and second projection
    # input: 24 s b h for GPT (4h MLP)
    split = sbh * bv * 4 + s * b * bv * (shape.fc1_out + shape.ffn)
    if not shape.flash_attention and recompute != "selective":
        # softmax output, its dropout mask and dropout output: 5 a s^2 b for GPT
        split += shape.heads * s * s * b * (bv + (bv + 1 if shape.dropout else 0))
    return (replicated + split) / t if layout.sp else replicated + split / t


@dataclass(frozen=True)
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    capacity: float  # what the device leaves for these (after RESERVED_BYTES and fragmentation)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def as_gb(self) -> dict:
        return {k: round(v / GB, 2) for k, v in (("weights", self.weights), ("gradients", self.gradients),
                                                   ("optimizer", self.optimizer), ("activations", self.activations),
                                                   ("total", self.total), ("capacity", self.capacity))}


def memory(shape: Shape, layout: Layout, memory_gb: float) -> Memory:
    """Peak bytes on the busiest device (the first pipeline stage; the last if its logits weigh more)."""
    params = stage_parameters(shape, layout)
    d = layout.dp
    bf16 = shape.bytes_per_value == 2
    zero = layout.zero_stage
    # Megatron keeps bf16 weights, fp32 main gradients and fp32 master weights + Adam moments (12 bytes); the
    # distributed optimizer shards the 12 bytes over DP. DeepSpeed ZeRO (Rajbhandari et al. 2020): 2 + 2 + 12,
    # stage 1 shards the 12, stage 2 the gradients too, stage 3 the weights as well.
    weights = params * shape.bytes_per_value / (d if zero == 3 else 1)
    grad_bytes = (2 if zero else layout.grad_reduce_bytes) if bf16 else 4
    gradients = params * grad_bytes / (d if zero >= 2 else 1)
    optimizer = params * (12 if bf16 else 8) / (d if (layout.distributed_optimizer or zero) else 1)
    m = layout.microbatches
    v = layout.vpp or 1
    layers = math.ceil(shape.layers / layout.pp)
    in_flight = min(layout.pp, m) * (1 + (layout.pp - 1) / (layout.pp * v) if v > 1 else 1)
    first = layers * in_flight * layer_activation_bytes(shape, layout)
    if layout.recompute == "full":  # one layer's full activations are live while it is recomputed
        first += layer_activation_bytes(shape, layout, "none")
    tokens = layout.micro_batch * shape.seq
    last = layers * layer_activation_bytes(shape, layout) + 4 * tokens * shape.vocab / layout.tp
    if layout.pp == 1:
        first += 4 * tokens * shape.vocab / layout.tp
    capacity = memory_gb * GB * USABLE_FRACTION - RESERVED_BYTES
    return Memory(weights, gradients, optimizer, max(first, last), capacity)
