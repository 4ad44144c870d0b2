"""Per-dataset validation loss on fixed held-out sequences (the same ones at every evaluation)."""
from __future__ import annotations

import torch

from ..data.batches import rank_microbatches
from ..distributed.runtime import Layout
from .records import EvalRecord


class Evaluator:
    """Holds each dataset's first validation sequences; `run(engine)` returns their mean token loss per dataset."""

    def __init__(self, valid_streams: dict, samples: int, micro_batch_size: int, layout: Layout):
        per_step = micro_batch_size * layout.dp
        count = max(per_step, -(-samples // per_step) * per_step)  # whole micro-batches on every rank
        self.batches = {name: torch.from_numpy(stream.first_samples(count)) for name, stream in valid_streams.items()}
        self.micro_batch_size, self.layout = micro_batch_size, layout

    def run(self, engine) -> EvalRecord:
        """Evaluate the engine's current weights on every dataset's held-out sequences."""
        losses = {}
        for name, tokens in self.batches.items():
            microbatches = rank_microbatches(tokens, self.layout.dp_rank, self.layout.dp, self.micro_batch_size)
            loss_sum, count = engine.eval_loss(microbatches)
            losses[name] = loss_sum / max(count, 1)
        return EvalRecord(loss_per_dataset=losses)
