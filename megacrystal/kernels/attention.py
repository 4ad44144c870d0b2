"""Crystal's causal attention core on a CPU: softmax(q k^T / head_dim) v without megatron's [b, heads, s, s] scores.

megatron's local DotProductAttention materialises every score with casts there and back; here the CPU gets the
kernel that measured fastest per case (docs/benchmarks/README.md, "measurements behind kernel choices"): fp32
eager keeps blockwise probabilities for a GEMM-only backward, train.compile runs the flash forward with a compiled
blockwise backward behind one opaque op, and anything else (bf16 eager, a GPU) PyTorch's fused
scaled_dot_product_attention. The constructor (heads per TP partition, Crystal's 1/head_dim scale) is megatron's;
anything but Crystal's case (an explicit mask, dropout, ...) goes to megatron's own forward.
`reference_causal_attention` is the plain torch path the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from .rotary import RotaryEmbedding


class CrystalCoreAttention(DotProductAttention):
    """Causal attention over [s, b, heads, head_dim] query/key/value; returns [s, b, heads x head_dim]. With
    `rotary` (kernels/rotary.py) it also applies the rotary embedding to query and key (megatron's GPTModel is
    then built without one)."""

    compiled_backward = False  # set by CrystalGPTModel.compile_layers_and_loss (train.compile)

    def __init__(self, *args, rotary: RotaryEmbedding | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rotary = rotary

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None and self.rotary is not None:
            raise NotImplementedError("packed sequences: the rotary embedding here counts positions from 0")
        # [b, heads, s, head_dim], contiguous: q/k/v are strided views of the fused QKV projection, and the CPU
        # kernels gain more on dense inputs than the copies cost
        if self.rotary is not None:
            q, k = self.rotary.to_heads_first(query), self.rotary.to_heads_first(key)
        else:
            q, k = query.permute(1, 2, 0, 3).contiguous(), key.permute(1, 2, 0, 3).contiguous()
        v = value.permute(1, 2, 0, 3).contiguous()
        mask_type = attn_mask_type or self.attn_mask_type
        if (attention_mask is not None or mask_type != AttnMaskType.causal or attention_bias is not None
                or packed_seq_params is not None or (self.training and self.attention_dropout.p > 0)
                or self.softmax_offset is not None or self.config.apply_query_key_layer_scaling):
            # Not Crystal's case (an explicit mask, dropout, ...): megatron's own implementation.
            query, key, value = (t.permute(2, 0, 1, 3) for t in (q, k, v))
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        ours = q.device.type == "cpu" and k.shape[1] == q.shape[1]  # on a CPU, without grouped-query attention
        if ours and self.compiled_backward:
            context = causal_attention_cpu(q, k, v, self.softmax_scale)
        elif ours and keeps_probabilities(q):
            context = causal_attention_keeping_probabilities(q, k, v, self.softmax_scale)
        else:
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                     enable_gqa=k.shape[1] != q.shape[1])
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


# -- CPU: flash forward, compiled blockwise backward (train.compile) ----------------------------------------
# PyTorch's CPU flash-attention backward runs one small GEMM per batch x head x query block and gains nothing from
# bf16; the blockwise backward below does the same math (probabilities recomputed from the saved log-sum-exp,
# FlashAttention-2's dS = P * (dP - rowsum(dO * O))) as batched GEMMs over all heads that inductor fuses around.
# It is an opaque custom op so that the compiled layers around it stay one graph.

QUERY_BLOCK = 128  # queries per step: a [b x heads, 128, <= s] fp32 probability block (the best measured)


@torch.library.custom_op("megacrystal::causal_attention", mutates_args=())
def causal_attention_cpu_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    out, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True,
                                                                                  scale=scale)
    return out, log_sum_exp.contiguous()  # the kernel's is [b, s, heads] in memory


@causal_attention_cpu_op.register_fake
def _(q, k, v, scale):
    b, h, s, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("megacrystal::causal_attention_backward", mutates_args=())
def causal_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                 log_sum_exp: torch.Tensor, grad_out: torch.Tensor, scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _compiled_backward(q, k, v, out, log_sum_exp, grad_out.contiguous(), scale)


@causal_attention_backward_op.register_fake
def _(q, k, v, out, log_sum_exp, grad_out, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, log_sum_exp = output
    ctx.save_for_backward(q, k, v, out, log_sum_exp)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_log_sum_exp):
    q, k, v, out, log_sum_exp = ctx.saved_tensors
    return (*causal_attention_backward_op(q, k, v, out, log_sum_exp, grad_out, ctx.scale), None)


causal_attention_cpu_op.register_autograd(_backward, setup_context=_setup_context)


def causal_attention_cpu(q, k, v, scale):
    """Causal softmax(q k^T * scale) v of [b, heads, s, d] tensors with the compiled blockwise backward."""
    return causal_attention_cpu_op(q, k, v, scale)[0]


def causal_attention_backward(q, k, v, out, log_sum_exp, grad_out, scale, block=QUERY_BLOCK):
    """Gradients of causal softmax(q k^T * scale) v for [b, heads, s, d] tensors, a block of queries at a time
    against the keys up to the block's end (the causal upper triangle is skipped)."""
    b, h, s, d = q.shape
    q, k, v, out, grad_out = (t.reshape(b * h, s, d) for t in (q, k, v, out, grad_out))
    log_sum_exp = log_sum_exp.reshape(b * h, s, 1)
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO * O)
    grad_q = []
    grad_k = torch.zeros(b * h, s, d, dtype=torch.float32, device=q.device)
    grad_v = torch.zeros(b * h, s, d, dtype=torch.float32, device=q.device)
    for start in range(0, s, block):
        end = min(start + block, s)
        q_blk, grad_out_blk = q[:, start:end], grad_out[:, start:end]
        keys, values = k[:, :end], v[:, :end]
        # in the inputs' dtype, as megatron's unfused bf16 attention: faster than an fp32 GEMM (no CPU bf16 GEMM
        # writes fp32), and the recomputed probabilities move by ~0.1% of a bf16 gradient
        scores = torch.bmm(q_blk, keys.transpose(1, 2)).float() * scale
        causal = torch.arange(start, end, device=q.device)[:, None] >= torch.arange(end, device=q.device)
        probs = torch.where(causal, torch.exp(scores - log_sum_exp[:, start:end]), 0.0)
        grad_v[:, :end] += torch.bmm(probs.to(q.dtype).transpose(1, 2), grad_out_blk).float()
        grad_probs = torch.bmm(grad_out_blk, values.transpose(1, 2)).float()
        grad_scores = (probs * (grad_probs - delta[:, start:end])).to(q.dtype)
        grad_q.append(torch.bmm(grad_scores, keys))
        grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q_blk).float()
    grad_q = torch.cat(grad_q, dim=1) * scale
    return (grad_q.view(b, h, s, d), (grad_k * scale).to(q.dtype).view(b, h, s, d),
            grad_v.to(q.dtype).view(b, h, s, d))


_compiled_backward = torch.compile(causal_attention_backward, dynamic=False)  # compiled on first use only


# -- CPU, fp32, eager: blockwise GEMMs keeping the probabilities ---------------------------------------------
# In fp32 the CPU flash kernel runs far below the GEMM rate. Here a block of queries at a time against the keys up
# to the block's end: scores by one batched GEMM, the causal triangle masked on the diagonal block only, softmax in
# place, and the probabilities kept for backward, which is then four batched GEMMs and one softmax-backward kernel
# per block, no exp recomputed. The cost is the probabilities' memory, about b x heads x s^2 / 2 fp32 values per
# layer (megatron's own attention keeps all s^2): used up to PROBABILITY_BUDGET bytes per layer, else the flash kernel.

PROBABILITY_BUDGET = 2**28  # bytes per layer (256 MiB: the small shape keeps 21 MiB)


def _query_blocks(s: int, block: int = QUERY_BLOCK):
    return [(start, min(start + block, s)) for start in range(0, s, block)]


def _kept_values(batch_heads: int, s: int) -> int:
    return batch_heads * sum((end - start) * end for start, end in _query_blocks(s))


def _probability_blocks(probs: torch.Tensor, batch_heads: int, s: int):
    """(start, end, the [b x heads, end - start, end] probabilities of queries start..end-1) per query block."""
    offset = 0
    for start, end in _query_blocks(s):
        size = batch_heads * (end - start) * end
        yield start, end, probs[offset:offset + size].view(batch_heads, end - start, end)
        offset += size


def keeps_probabilities(q: torch.Tensor) -> bool:
    """Whether causal_attention_keeping_probabilities serves these [b, heads, s, d] queries: fp32 on a CPU and the
    kept probabilities within the budget. The choice depends on shapes only, never on how many ranks share a host,
    so a run's losses do not depend on its ranks' placement."""
    b, h, s, _ = q.shape
    return (q.dtype == torch.float32 and q.device.type == "cpu"
            and _kept_values(b * h, s) * q.element_size() <= PROBABILITY_BUDGET)


class _AttentionKeepingProbabilities(torch.autograd.Function):
    # Measured choices: GEMM outputs are fresh tensors (bmm into a strided view is slower), then copied or added;
    # transposed operands are made row-major once; the mask is an added -inf triangle.
    @staticmethod
    def forward(ctx, q, k, v, scale):
        b, h, s, d = q.shape
        q = (q * scale).reshape(b * h, s, d)  # scaling q (s x d) is cheaper than scaling the scores (s x s)
        k, v = k.reshape(b * h, s, d), v.reshape(b * h, s, d)
        keys_t = k.transpose(1, 2).contiguous()
        probs = q.new_empty(_kept_values(b * h, s))
        above_diagonal = torch.full((QUERY_BLOCK, QUERY_BLOCK), float("-inf"), device=q.device).triu_(1)
        out = []
        for start, end, p in _probability_blocks(probs, b * h, s):
            torch.bmm(q[:, start:end], keys_t[:, :, :end], out=p)
            p[:, :, start:end].add_(above_diagonal[:end - start, :end - start])
            torch.ops.aten._softmax.out(p, -1, False, out=p)
            out.append(torch.bmm(p, v[:, :end]))
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.input_shape = scale, (b, h, s, d)
        return torch.cat(out, dim=1).view(b, h, s, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors  # q is scaled
        bh, s, d = q.shape
        grad_out = grad_out.reshape(bh, s, d)
        values_t = v.transpose(1, 2).contiguous()
        grad_q = []
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        for start, end, p in _probability_blocks(probs, bh, s):
            grad_v[:, :end] += torch.bmm(p.transpose(1, 2), grad_out[:, start:end])
            grad_scores = torch.bmm(grad_out[:, start:end], values_t[:, :, :end])  # d probs, then in place
            torch.ops.aten._softmax_backward_data.out(grad_scores, p, -1, p.dtype, grad_input=grad_scores)
            grad_q.append(torch.bmm(grad_scores, k[:, :end]))
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q[:, start:end])  # q is scaled: done
        shape = ctx.input_shape
        grad_q = torch.cat(grad_q, dim=1).mul_(ctx.scale)
        return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape), None


def causal_attention_keeping_probabilities(q, k, v, scale):
    """Causal softmax(q k^T * scale) v of fp32 [b, heads, s, d] CPU tensors (see above); [b, heads, s, d]."""
    return _AttentionKeepingProbabilities.apply(q, k, v, scale)


def reference_causal_attention(q, k, v, scale):
    """The torch reference: causal softmax(q k^T * scale) v of [b, heads, s, d] tensors, scores materialised."""
    s = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril_()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)
