"""Cross entropy over vocab-parallel logits, computed in fp32 a block of rows at a time.

megatron's vocab_parallel_cross_entropy converts the whole [s, b, vocab/tp] logit tensor to fp32 and keeps the
fp32 softmax for backward: with Crystal's 32k vocabulary that is the largest tensor of a step (4 bytes x vocab
per token) and, in bf16, two full-size casts. Here each block of rows is converted, reduced and dropped while it
is still in cache; backward recomputes exp from the saved logits and the per-row log-sum-exp. Same math, same
three TP all-reduces (max and sum of exp of the shards' log-sum-exps, target logit), the loss in fp32.
`reference_cross_entropy` is the plain torch path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

ROWS_PER_BLOCK = 16  # 16 rows x 32k vocab x 4 bytes = 2 MB of fp32 at a time, still in cache


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, vocab_start: int,
                compiled: bool) -> torch.Tensor:
        shard = logits.shape[-1]
        flat, labels = logits.reshape(-1, shard), target.reshape(-1)
        local = (labels >= vocab_start) & (labels < vocab_start + shard)  # this rank holds the target's logit
        index = torch.where(local, labels - vocab_start, 0).unsqueeze(1)
        # log-sum-exp of each row over this shard, then over the shards: max and sum of exp across TP ranks
        log_sum_exp = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        for block in range(0, flat.shape[0], ROWS_PER_BLOCK):
            part = slice(block, block + ROWS_PER_BLOCK)
            log_sum_exp[part] = _log_sum_exp(flat[part].to(torch.float32, copy=True))
        if group is not None:
            top = log_sum_exp.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            sum_exp = (log_sum_exp - top).exp_()
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
            log_sum_exp = top + sum_exp.log_()
        picked = flat.gather(1, index).squeeze(1).float()  # the target's logit, or column 0's off the shard
        target_logit = picked * local
        if group is not None:
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(logits, index, local, log_sum_exp, picked)
        ctx.overwrite = not logits.is_leaf  # a caller's leaf tensor is never written to
        ctx.compiled = compiled
        return (log_sum_exp - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, index, local, log_sum_exp, picked = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        scale = grad_loss.reshape(-1).float()
        # d loss / d logit = (softmax - one_hot(target)) x the row's incoming gradient. Eager, the gradient
        # overwrites the logits block by block: nothing else reads them after the loss (the output layer's
        # backward needs its input and weight), and a fresh [s, b, vocab] tensor would cost a full pass of page
        # faults on a CPU. Compiled, one fused kernel writes a new tensor (from memory the allocator kept).
        if ctx.compiled:
            grad = _compiled_scaled_softmax(flat, log_sum_exp, scale)
        elif ctx.overwrite and flat.dtype == torch.float32:  # in place, no temporaries: faster than below
            grad = flat
            for block in range(0, flat.shape[0], ROWS_PER_BLOCK):
                part = slice(block, block + ROWS_PER_BLOCK)
                grad[part].sub_(log_sum_exp[part, None]).exp_().mul_(scale[part, None])
        else:
            grad = flat if ctx.overwrite else torch.empty_like(flat)
            for block in range(0, flat.shape[0], ROWS_PER_BLOCK):
                part = slice(block, block + ROWS_PER_BLOCK)
                grad[part] = _scaled_softmax(flat[part], log_sum_exp[part], scale[part])
        # The one-hot term, in fp32 before rounding: the target column holds (p - 1) x scale, not p x scale
        # rounded first. A row whose target another TP rank holds has index 0, local 0: p x scale, unchanged.
        # (Advanced indexing, not scatter_: on CPU scatter_ into a [tokens, vocab] bf16 tensor is slow.)
        picked_grad = ((picked - log_sum_exp).exp_() - local.float()) * scale
        grad[torch.arange(grad.shape[0], device=grad.device), index.squeeze(1)] = picked_grad.to(grad.dtype)
        return grad.view_as(logits), None, None, None, None


def _scaled_softmax(logits: torch.Tensor, log_sum_exp: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """exp(logits - log_sum_exp) x scale per row, in the logits' dtype: one fused pass once compiled."""
    return ((logits.float() - log_sum_exp[:, None]).exp() * scale[:, None]).to(logits.dtype)


_compiled_scaled_softmax = torch.compile(_scaled_softmax, dynamic=False)  # compiled on first use only


def _log_sum_exp(rows: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp over dim 1, in place on an fp32 block it may overwrite (no temporaries on CPU)."""
    top = rows.amax(dim=1, keepdim=True)
    return rows.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                 compiled: bool = False) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) of logits [s, b, vocab / tp] whose shard starts at tp_rank x vocab / tp;
    `group` is the tensor-parallel group (None or a group of one: the whole vocabulary is here). `compiled`
    computes the gradient with an inductor kernel (train.compile), faster on CPU than the eager blocks."""
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    rank = dist.get_rank(group) if group is not None else 0
    return _VocabParallelCrossEntropy.apply(logits, target, group, rank * logits.shape[-1], compiled)


def reference_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The torch reference: per-token fp32 cross entropy of whole-vocabulary logits [..., vocab]."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
