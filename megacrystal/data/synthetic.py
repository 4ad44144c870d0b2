"""A learnable synthetic token stream: each global batch is a deterministic function of (seed, step).

Sequences are walks on a fixed random sparse Markov chain, so a model's loss falls well below log(vocab)
as it learns the transitions; it needs no files and is independent of the data-parallel size.
"""
from __future__ import annotations

import numpy as np
import torch

_BRANCHING = 4  # successors per token: the entropy floor is about log(4) nats


class SyntheticTokens:
    """Global batches of [B, seq_length + 1] token ids."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        rng = np.random.default_rng([seed, 0x5EED])
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, _BRANCHING))

    def global_batch(self, step: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        tokens = np.empty((batch_size, self.seq_length + 1), dtype=np.int64)
        tokens[:, 0] = rng.integers(0, self.vocab_size, size=batch_size)
        choices = rng.integers(0, _BRANCHING, size=(batch_size, self.seq_length))
        for t in range(self.seq_length):
            tokens[:, t + 1] = self.successors[tokens[:, t], choices[:, t]]
        return torch.from_numpy(tokens)
