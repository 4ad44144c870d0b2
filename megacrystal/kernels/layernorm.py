"""LayerNorm with bias that also works under sequence parallelism: the torch norm of the local spec (apex's
FusedLayerNorm and TE's fused norms are the alternatives kernels/spec.py takes on CUDA)."""
from __future__ import annotations

import torch


class CrystalLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm (weight and bias) built from a TransformerConfig, as megatron's norm specs expect.

    megatron's local-spec WrappedTorchNorm refuses sequence parallelism; under SP every rank holds a slice
    of the sequence, so the norm's parameters are marked `sequence_parallel` and megatron all-reduces their
    gradients across the tensor-parallel group in finalize_model_grads.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
