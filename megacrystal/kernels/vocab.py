"""The vocabulary weight's two uses, embedding lookup and output projection, with fast weight gradients.

Upstream, each use returns a dense [vocab, hidden] weight gradient in the parameter's dtype, which autograd sums
(the weight is tied) and megatron's DDP hook then adds into the fp32 `main_grad`: three full passes over the
largest weight for an embedding gradient that touches only this step's tokens' rows, and a projection gradient
`g^T x` whose first operand is the transposed [tokens, vocab] logit gradient, which oneDNN's bf16 GEMM runs at
half speed. When the weight lives in megatron's DDP buffer (it has `main_grad`), both uses here write straight
into it instead (through distributed/grad_buffer.accumulate: the step's first gradient overwrites), the way
megatron's gradient-accumulation fusion does on GPUs: the embedding adds its rows (`index_add_`); the
projection, in bf16, computes `x^T g` from row-major operands and puts it in transposed, in fp32 one GEMM into
`main_grad`. Then megatron's protocol: `grad_added_to_main_grad` set, and an unused gradient tensor handed to
autograd so DDP's hook runs (overlap_grad_reduce asserts it has a gradient) and adds nothing. Where both uses
share a pipeline stage only the projection hands one (two would be summed: a pass over [vocab, hidden]).
Without `main_grad` (the DeepSpeed engine) both return the usual dense gradient. `reference_logits` and
megatron's own VocabParallelEmbedding / ColumnParallelLinear are the reference paths.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    _gather_along_first_dim,
    _reduce_scatter_along_first_dim,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from ..distributed.grad_buffer import accumulate


def _writes_main_grad(weight: torch.Tensor) -> bool:
    """Whether megatron's DDP owns this weight's gradient buffer."""
    return getattr(weight, "main_grad", None) is not None and hasattr(weight, "grad_added_to_main_grad")


def _placeholder(weight: torch.Tensor, hand_gradient: bool = True) -> torch.Tensor | None:
    """megatron's protocol after writing main_grad: flagged, and an unused gradient for DDP's hooks."""
    weight.grad_added_to_main_grad = True
    if not hand_gradient:
        return None
    weight.grad_is_placeholder = True  # for distributed/grad_buffer.py's pre-hook: nothing to add
    return torch.empty_like(weight)


def _put_transposed(main_grad: torch.Tensor, product_t: torch.Tensor, overwrite: bool) -> None:
    if overwrite:
        main_grad.copy_(product_t.t())
    else:
        main_grad.add_(product_t.t())


_compiled_put_transposed = torch.compile(_put_transposed, dynamic=False)  # compiled on first use only


VOCAB_BLOCK = 4096  # CPU: logits for this many vocabulary rows per GEMM call (the best measured)


def _project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T. On a CPU a block of vocabulary rows at a time, written in place: oneDNN's bf16 GEMM is
    faster on blocks of the vocabulary than in one call (fp32: the same either way)."""
    if hidden.device.type != "cpu":
        return torch.matmul(hidden, weight.t())
    logits = hidden.new_empty(*hidden.shape[:-1], weight.shape[0])
    hidden_2d, logits_2d = hidden.reshape(-1, hidden.shape[-1]), logits.view(-1, weight.shape[0])
    for start in range(0, weight.shape[0], VOCAB_BLOCK):
        block = slice(start, start + VOCAB_BLOCK)
        torch.mm(hidden_2d, weight[block].t(), out=logits_2d[:, block])
    return logits


class _EmbeddingLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, output_layer_hands_gradient: bool) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        ctx.output_layer_hands_gradient = output_layer_hands_gradient
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, weight = ctx.saved_tensors
        rows, grad_rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if not ctx.needs_input_grad[1]:
            return None, None, None
        if _writes_main_grad(weight):
            grad_rows = grad_rows.to(weight.main_grad.dtype)
            accumulate(weight, lambda main_grad: main_grad.zero_().index_add_(0, rows, grad_rows),
                       lambda main_grad: main_grad.index_add_(0, rows, grad_rows))
            return None, _placeholder(weight, not ctx.output_layer_hands_gradient), None
        return None, torch.zeros_like(weight).index_add_(0, rows, grad_rows), None


class _OutputProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, allreduce_dgrad: bool, sequence_parallel: bool,
                tp_group, compiled: bool) -> torch.Tensor:
        if sequence_parallel:  # each TP rank holds a slice of the sequence: project all of it
            hidden = _gather_along_first_dim(hidden, tp_group)
        ctx.save_for_backward(hidden, weight)
        ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = allreduce_dgrad, sequence_parallel, tp_group
        ctx.compiled = compiled
        return _project(hidden, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad.matmul(weight)
        handle = None
        if ctx.allreduce_dgrad:  # every TP rank had the same input: sum its vocab shards' gradients
            handle = dist.all_reduce(grad_hidden, group=ctx.tp_group, async_op=True)
        grad_2d, hidden_2d = grad.reshape(-1, grad.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        if not ctx.needs_input_grad[1]:  # a frozen weight
            grad_weight = None
        elif not _writes_main_grad(weight):
            grad_weight = grad_2d.t().matmul(hidden_2d)
        elif weight.main_grad.dtype == grad.dtype:  # fp32: the accumulation fuses into the GEMM
            accumulate(weight, lambda main_grad: torch.mm(grad_2d.t(), hidden_2d, out=main_grad),
                       lambda main_grad: main_grad.addmm_(grad_2d.t(), hidden_2d))
            grad_weight = _placeholder(weight)
        else:  # bf16 into fp32: (x^T g)^T with both operands row-major, faster than g^T x on CPU
            product_t = hidden_2d.t().contiguous().matmul(grad_2d)
            put = _compiled_put_transposed if ctx.compiled else _put_transposed
            accumulate(weight, lambda main_grad: put(main_grad, product_t, True),
                       lambda main_grad: put(main_grad, product_t, False))
            grad_weight = _placeholder(weight)
        if handle is not None:
            handle.wait()
        if ctx.sequence_parallel:  # sum the shards' gradients and keep this rank's slice of the sequence
            grad_hidden = _reduce_scatter_along_first_dim(grad_hidden, ctx.tp_group)
        return grad_hidden, grad_weight, None, None, None, None


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The torch reference of the output projection: hidden @ weight^T in one call."""
    return torch.matmul(hidden, weight.t())


class CrystalVocabEmbedding(VocabParallelEmbedding):
    """megatron's VocabParallelEmbedding (same parameters, masking and TP reductions) through _EmbeddingLookup."""

    output_layer_hands_gradient = False  # set by use_vocab_layers when the tied output layer is on this stage

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        sharded = self.tp_group.size() > 1
        if sharded:  # ids outside this rank's vocab shard read row 0, then are zeroed
            off_shard = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            input_ = (input_ - self.vocab_start_index).masked_fill_(off_shard, 0)
        output = _EmbeddingLookup.apply(input_, self.weight, self.output_layer_hands_gradient)
        if sharded:
            output = output.masked_fill(off_shard.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:  # [b, s, h] -> [s, b, h], scattered along the sequence
            return reduce_scatter_to_sequence_parallel_region(output.transpose(0, 1).contiguous(),
                                                              group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(output, group=self.tp_group)


class CrystalOutputLayer(ColumnParallelLinear):
    """megatron's ColumnParallelLinear for the tied output projection (no bias), through _OutputProjection."""

    compiled = False  # train.compile: the transposed main_grad add as an inductor kernel

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, tp_group=None, **_unused):
        if bias is not None or grad_output_buffer is not None:
            raise ValueError("megacrystal's output layer has no bias and computes its weight gradient at once "
                             "(defer_embedding_wgrad_compute is not supported)")
        return _OutputProjection.apply(input, weight, allreduce_dgrad, sequence_parallel, tp_group, self.compiled)


def use_vocab_layers(model) -> None:
    """Turn a GPTModel's embedding and output layer (GPTModel builds them itself, so the instances are re-classed:
    same parameters and state) into the classes above."""
    if model.pre_process:
        model.embedding.word_embeddings.__class__ = CrystalVocabEmbedding
    if model.post_process:
        model.output_layer.__class__ = CrystalOutputLayer
    if model.pre_process and model.post_process:
        # Both uses on one stage: megatron marks the weight zero_out_wgrad so DDP's hook adds its fused wgrad's
        # placeholder zeroed; here the placeholder is never added (both uses wrote main_grad themselves).
        model.embedding.word_embeddings.output_layer_hands_gradient = True
        model.shared_embedding_or_output_weight().zero_out_wgrad = False
