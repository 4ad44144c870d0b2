"""Compute time of one micro-batch on one device: the layers' GEMMs by shape, the attention core, the
element-wise (memory-bound) work, and the output layer with its cross entropy.

Backward costs two GEMMs per forward GEMM (input gradient and weight gradient, same FLOPs and, for this
efficiency curve, the same dimensions). Full recomputation runs each layer's forward again inside backward;
selective recomputation (Korthikanti et al. 2022) runs the attention core again.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import Constants, Device
from .shapes import Layout, Shape


def gemm_efficiency(m: float, n: float, k: float, c: Constants) -> float:
    """Sustained fraction of peak of an (m x k) @ (k x n) GEMM: c.gemm_max, less on thin dimensions."""
    eff = c.gemm_max
    for d in (m, n, k):
        eff *= d / (d + c.gemm_half_dim)
    return eff


def gemm_seconds(m: float, n: float, k: float, dev: Device, c: Constants) -> float:
    """Time of one GEMM (2 m n k FLOPs) on `dev`."""
    return 2 * m * n * k / (dev.peak_tflops * 1e12 * gemm_efficiency(m, n, k, c))


def _memory_seconds(nbytes: float, dev: Device, c: Constants) -> float:
    return nbytes / (dev.hbm_gbytes_s * 1e9 * c.hbm_efficiency)


@dataclass(frozen=True)
class LayerTime:
    """One layer, one micro-batch, one device: seconds forward and backward, by kind of work."""

    gemm_fwd: float
    attention_fwd: float
    elementwise_fwd: float
    gemm_bwd: float
    attention_bwd: float
    elementwise_bwd: float

    @property
    def fwd(self) -> float:
        return self.gemm_fwd + self.attention_fwd + self.elementwise_fwd

    @property
    def bwd(self) -> float:
        return self.gemm_bwd + self.attention_bwd + self.elementwise_bwd


def layer_time(shape: Shape, layout: Layout, dev: Device, c: Constants) -> LayerTime:
    """Forward and backward time of one transformer layer for one micro-batch (recomputation included)."""
    s, h, t = shape.seq, shape.hidden, layout.tp
    tokens = layout.micro_batch * s
    gemm = (gemm_seconds(tokens, shape.qkv_out / t, h, dev, c) + gemm_seconds(tokens, h, h / t, dev, c)
            + gemm_seconds(tokens, shape.fc1_out / t, h, dev, c) + gemm_seconds(tokens, h, shape.ffn / t, dev, c))
    attn_fwd, attn_bwd = _attention(shape, layout, dev, c)
    ew_fwd, ew_bwd = _elementwise(shape, layout, dev, c)
    gemm_bwd = 2 * gemm
    if layout.recompute == "full":  # the whole forward again before each layer's backward
        gemm_bwd += gemm
        attn_bwd += attn_fwd
        ew_bwd += ew_fwd
    elif layout.recompute == "selective":  # the attention core again (scores, softmax, dropout)
        attn_bwd += attn_fwd
    return LayerTime(gemm, attn_fwd, ew_fwd, gemm_bwd, attn_bwd, ew_bwd)


def _attention(shape: Shape, layout: Layout, dev: Device, c: Constants) -> tuple[float, float]:
    """The attention core (scores and weighted sum) forward and backward, without recomputation."""
    s, b = shape.seq, layout.micro_batch
    heads = shape.heads / layout.tp
    head_dim = shape.hidden // shape.heads
    if shape.flash_attention:
        # fused kernel: causal, so half of the 4 s^2 d FLOPs per head run; backward runs 5 GEMMs to forward's 2
        fwd_flops = 4 * b * heads * s * s * head_dim / 2
        fwd = fwd_flops / (dev.peak_tflops * 1e12 * c.attention_efficiency)
        return fwd, 2.5 * fwd
    # unfused: batched GEMMs over the full s x s scores (masked afterwards), and the scores through memory:
    # written, read and written by the fused scale-mask-softmax, then (with dropout) read, masked and written
    gemms = 2 * b * heads * gemm_seconds(s, s, head_dim, dev, c)
    scores = b * heads * s * s
    bv = shape.bytes_per_value
    fwd_bytes = scores * (3 * bv + (2 * bv + 1 if shape.dropout else 0))
    fwd = gemms + _memory_seconds(fwd_bytes, dev, c)
    # backward reads the gradient and the saved probabilities (and mask) and writes a gradient: as many bytes
    return fwd, 2 * gemms + _memory_seconds(fwd_bytes, dev, c)


def _elementwise(shape: Shape, layout: Layout, dev: Device, c: Constants) -> tuple[float, float]:
    """Norms, residual adds, dropout, bias and activation passes: values read and written, at HBM speed.

    Per element of the hidden-size stream (split by TP only under sequence parallelism): two norms (read and
    write: 4 values forward, 8 backward) and two residual adds (6 forward, 4 backward), dropout 1.5 more each way.
    Per element of the FFN activation (always split by TP): GELU 2 forward / 3 backward, SwiGLU 3 / 5. Rotary
    and bias on the QKV output: 2 each way.
    """
    tokens = layout.micro_batch * shape.seq
    stream = tokens * shape.hidden / (layout.tp if layout.sp else 1)
    act = tokens * shape.ffn / layout.tp
    qkv = tokens * shape.qkv_out / layout.tp
    drop = 3 if shape.dropout else 0
    fwd_values = stream * (10 + drop) + act * (3 if shape.swiglu else 2) + 2 * qkv
    bwd_values = stream * (12 + drop) + act * (5 if shape.swiglu else 3) + 2 * qkv
    bv = shape.bytes_per_value
    return _memory_seconds(fwd_values * bv, dev, c), _memory_seconds(bwd_values * bv, dev, c)


def output_layer_time(shape: Shape, layout: Layout, dev: Device, c: Constants) -> tuple[float, float]:
    """The vocabulary projection and cross entropy of one micro-batch (the last stage's extra work).

    The logits go through memory in fp32: converted, max and log-sum-exp, gradient written (about 24 bytes per
    logit in all).
    """
    tokens = layout.micro_batch * shape.seq
    vocab = shape.vocab / layout.tp
    gemm = gemm_seconds(tokens, vocab, shape.hidden, dev, c)
    loss = _memory_seconds(24 * tokens * vocab, dev, c)
    return gemm + loss / 2, 2 * gemm + loss / 2


def optimizer_seconds(params_local: float, precision_bytes: int, dev: Device, c: Constants) -> float:
    """Adam over this device's share of the parameters: memory-bound, about 34 bytes a parameter under bf16
    (fp32 master, moments and gradient read; master and moments written; bf16 copy written; the norm's read)."""
    per_param = 34 if precision_bytes == 2 else 32
    return _memory_seconds(params_local * per_param, dev, c)
