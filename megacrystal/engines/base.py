"""What the trainer needs from an engine; megatron (DDP / distributed optimizer) and DeepSpeed implement it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from ..data.batches import Microbatch


@dataclass
class StepResult:
    """Global (all-rank) results of one optimizer step."""

    loss: float  # mean per-token loss over the global batch
    tokens: int  # tokens that carried loss in the global batch
    grad_norm: float
    skipped: bool  # the optimizer skipped the update (non-finite gradients)
    # [B, 2] float64 (loss sum, loss tokens) of every row of the global batch, in batch order; None when the
    # engine does not report rows (per-dataset training loss is then not logged).
    row_losses: Optional[torch.Tensor] = None


class Engine(Protocol):
    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepResult:
        """Forward, backward and one optimizer step over this rank's micro-batches at learning rate `lr`."""
        ...

    def eval_loss(self, microbatches: list[Microbatch]) -> tuple[float, int]:
        """Global (loss sum, token count) of a forward pass without gradients."""
        ...
