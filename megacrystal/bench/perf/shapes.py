"""What the throughput model is asked about: a transformer's shape and a parallel layout of its training step."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer as the step-time and memory model needs it."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    swiglu: bool = True
    kv_heads: Optional[int] = None  # grouped-query attention; None: one per head
    dropout: bool = False  # GPT-style dropout after attention and MLP (stores masks; Crystal trains without)
    flash_attention: bool = True  # fused attention: no s x s scores in memory; False: Megatron's 2021 unfused path
    bytes_per_value: int = 2  # activations and weights: 2 under bf16, 4 under fp32

    @classmethod
    def of(cls, model, precision: str = "bf16") -> "Shape":
        """The shape of a config's `model` section (Crystal: SwiGLU, one K/V head per head, no dropout)."""
        return cls(model.num_layers, model.hidden_size, model.num_heads, model.ffn_hidden_size, model.vocab_size,
                   model.seq_length, bytes_per_value=2 if precision == "bf16" else 4)

    @property
    def qkv_out(self) -> int:
        """Output width of the fused QKV projection."""
        head_dim = self.hidden // self.heads
        return self.hidden + 2 * (self.kv_heads or self.heads) * head_dim

    @property
    def fc1_out(self) -> int:
        """Output width of the first MLP projection (SwiGLU's gate and value halves together)."""
        return 2 * self.ffn if self.swiglu else self.ffn

    def layer_weights(self) -> int:
        """Matrix weights of one layer (biases and norms are negligible at these widths)."""
        return self.hidden * self.qkv_out + self.hidden * self.hidden + self.hidden * self.fc1_out \
            + self.ffn * self.hidden

    def parameters(self) -> int:
        """All parameters, the (tied) embedding counted once."""
        return self.layers * (self.layer_weights() + 4 * self.hidden) + self.vocab * self.hidden

    def model_flops_per_token(self) -> float:
        """Training FLOPs per token as Megatron and the README count them: 6 x matmul weights, the logits, and
        12 L h s for the (unmasked) attention scores; recomputation is not counted."""
        return 6 * self.layers * self.layer_weights() + 6 * self.vocab * self.hidden \
            + 12 * self.layers * self.hidden * self.seq


@dataclass(frozen=True)
class Layout:
    """One way to run a step: the parallel degrees, micro-batch, recomputation and optimizer sharding."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved 1F1B)
    sp: bool = True  # sequence parallelism (with tp > 1)
    recompute: Literal["none", "selective", "full"] = "none"
    distributed_optimizer: bool = True  # megatron's ZeRO-1: optimizer state sharded over data parallelism
    zero_stage: int = 0  # DeepSpeed ZeRO instead (engine: deepspeed); 0 with the megatron engine
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    tp_comm_overlap: bool = False
    grad_reduce_bytes: int = 4  # megatron reduces gradients in fp32 under bf16

    @property
    def microbatches(self) -> int:
        """Micro-batches each pipeline runs per step."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp

    def as_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "Layout":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def describe(self) -> str:
        """One short line: tp x pp (vpp) x dp, micro-batch, recompute, optimizer sharding."""
        vpp = f" (vpp {self.vpp})" if self.vpp else ""
        shard = f"ZeRO-{self.zero_stage}" if self.zero_stage else ("dist-opt" if self.distributed_optimizer
                                                                   else "replicated optimizer")
        return (f"tp {self.tp} x pp {self.pp}{vpp} x dp {self.dp}, mbs {self.micro_batch}"
                f"{', sp' if self.sp and self.tp > 1 else ''}, recompute {self.recompute}, {shard}")
