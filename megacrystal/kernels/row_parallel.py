"""megatron's RowParallelLinear, handing its own TP group to the linear autograd function.

Upstream (megatron-core 0.16) forward passes `tp_group=None` there, which makes
get_tensor_model_parallel_group_if_none call warnings.warn on rank 0 in every forward: a graph break that
splits each torch.compile'd layer in three. Its matmul does no communication either way, so megatron's
RowParallelLinear itself is the reference path.
"""
from __future__ import annotations

from megatron.core.tensor_parallel.layers import RowParallelLinear


class CrystalRowParallelLinear(RowParallelLinear):
    """RowParallelLinear whose forward names its TP group (no warning, no graph break under torch.compile)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group", self.tp_group) is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)
