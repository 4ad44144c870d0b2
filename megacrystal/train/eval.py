"""Per-dataset validation loss on fixed held-out sequences (the same ones at every evaluation), and its BPB."""
from __future__ import annotations

import torch

from ..data.batches import rank_microbatches
from ..distributed.runtime import Layout
from .domain_loss import TokenBytes, bits_per_byte
from .records import EvalRecord


class Evaluator:
    """Holds each dataset's first validation sequences; `run(engine)` returns their mean token loss per dataset."""

    def __init__(self, valid_streams: dict, samples: int, micro_batch_size: int, layout: Layout,
                 token_bytes: TokenBytes | None = None):
        per_step = micro_batch_size * layout.dp
        count = max(per_step, -(-samples // per_step) * per_step)  # whole micro-batches on every rank
        self.batches = {name: torch.from_numpy(stream.first_samples(count)) for name, stream in valid_streams.items()}
        self.micro_batch_size, self.layout = micro_batch_size, layout
        # The text bytes behind each dataset's validation labels, for bits per byte.
        self.bytes = {name: token_bytes.label_bytes(rows) for name, rows in self.batches.items()} \
            if token_bytes else {}
        self.last: dict[str, tuple[float, int]] = {}

    def run(self, engine) -> EvalRecord:
        """Evaluate the engine's current weights on every dataset's held-out sequences."""
        losses = {}
        for name, tokens in self.batches.items():
            microbatches = rank_microbatches(tokens, self.layout.dp_rank, self.layout.dp, self.micro_batch_size)
            loss_sum, count = engine.eval_loss(microbatches)
            self.last[name] = (loss_sum, count)
            losses[name] = loss_sum / max(count, 1)
        return EvalRecord(loss_per_dataset=losses, **self._bits_per_byte())

    def _bits_per_byte(self) -> dict:
        """{"bpb": over all datasets, "bpb_per_dataset": {...}} of the last `run`; empty without a tokenizer."""
        if not self.bytes or not self.last:
            return {}
        per = {name: bits_per_byte(self.last[name][0], self.bytes[name]) for name in self.last}
        total = bits_per_byte(sum(s for s, _ in self.last.values()), sum(self.bytes[n] for n in self.last))
        return {"bpb": total, "bpb_per_dataset": per}
