"""Micro-batches: the unit engines train on, cut from a global batch of token rows for one data-parallel rank."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Microbatch:
    """One micro-batch of packed token sequences: inputs, next-token labels and a loss mask, all [b, s]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


def rank_microbatches(global_tokens: torch.Tensor, dp_rank: int, dp_size: int, micro_batch_size: int,
                      loss_mask: torch.Tensor | None = None) -> list[Microbatch]:
    """Rank d takes the d-th contiguous 1/dp of the [B, S+1] rows, split into micro-batches of inputs/labels.

    Every layout therefore trains on the same global batch, whatever its data-parallel size.
    """
    rows = global_tokens.shape[0] // dp_size
    mine = global_tokens[dp_rank * rows:(dp_rank + 1) * rows]
    mask = torch.ones_like(mine[:, 1:], dtype=torch.float32) if loss_mask is None else \
        loss_mask[dp_rank * rows:(dp_rank + 1) * rows].float()
    return [
        Microbatch(tokens=mine[i:i + micro_batch_size, :-1].contiguous(),
                   labels=mine[i:i + micro_batch_size, 1:].contiguous(),
                   loss_mask=mask[i:i + micro_batch_size].contiguous())
        for i in range(0, rows, micro_batch_size)
    ]
