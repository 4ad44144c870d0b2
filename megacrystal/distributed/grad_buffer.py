"""megatron DDP's fp32 gradient buffer, written by each step's first gradient instead of zeroed and added to.

megatron zeroes the whole buffer before every step (a pass over 4 bytes x parameters: 11 ms at the small shape on
a CPU) and its backward hook adds every gradient into it. Here zero_grad_buffer only marks each parameter's
`main_grad` stale; the first gradient of a step is copied in, later ones (more micro-batches) are added, and a
parameter that got no gradient is zeroed before the gradients are reduced. The bucket padding is never written, so
it stays zero from allocation. Works with megatron's own hook unchanged: ours runs first (an AccumulateGrad
pre-hook) and sets `grad_added_to_main_grad`, so megatron's only clears `.grad` and tracks bucket readiness.
Code that writes `main_grad` itself (kernels/vocab.py) goes through `accumulate` too and hands autograd a
placeholder marked `grad_is_placeholder`.
"""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core.distributed import DistributedDataParallel


def accumulate(param: torch.nn.Parameter, write: Callable[[torch.Tensor], None],
               add: Callable[[torch.Tensor], None]) -> None:
    """Put a gradient into `param.main_grad`: `write(main_grad)` overwrites it when it is stale (this step's
    first gradient), else `add(main_grad)` adds to it."""
    if getattr(param, "main_grad_stale", False):
        write(param.main_grad)
        param.main_grad_stale = False
    else:
        add(param.main_grad)


def _pre_hook(param: torch.nn.Parameter):
    def hook(grads):
        grad = grads[0]
        if grad is None:
            return None
        if getattr(param, "grad_is_placeholder", False):  # already in main_grad
            param.grad_is_placeholder = False
            return None
        accumulate(param, lambda main_grad: main_grad.copy_(grad), lambda main_grad: main_grad.add_(grad))
        param.grad_added_to_main_grad = True  # megatron's hook: nothing left to add
        return None

    return hook


def write_first_gradients(ddp: DistributedDataParallel) -> None:
    """Switch one megatron DDP model chunk to stale-marking instead of zeroing (see the module docstring)."""
    params = list(ddp.params_with_grad)
    for param in params:
        accumulator = param.expand_as(param).grad_fn.next_functions[0][0]  # the node megatron's hook is on
        accumulator.register_prehook(_pre_hook(param))
        param.main_grad_stale = False  # the buffer starts zeroed

    def zero_grad_buffer():
        for param in params:
            param.grad_added_to_main_grad = False
            param.grad_is_placeholder = False
            param.main_grad_stale = True
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            group.reset()

    def zero_stale_gradients():  # before the reductions: a parameter no backward reached this step
        for param in params:
            if param.main_grad_stale:
                param.main_grad.zero_()

    ddp.zero_grad_buffer = zero_grad_buffer
    ddp.zero_stale_gradients = zero_stale_gradients
