"""Per-domain metrics: each step's training loss per dataset of the blend, and bits per byte of validation text.

The training loss per dataset sums the engine's per-row (loss sum, tokens) over the rows each dataset filled;
rows are in global-batch order at every layout, so the result does not depend on how the batch was split.
Bits per byte (BPB) divides a validation NLL by the UTF-8 bytes of the text its tokens stand for, so runs with
different tokenizers or mixes compare: BPB = NLL_nats / (ln 2 x bytes).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from megacrystal.data.tokenizer import SPACE


def sums_per_dataset(row_losses: torch.Tensor, samples: list[tuple[str, int]]) -> dict[str, tuple[float, float]]:
    """{dataset: (loss sum, tokens) over its rows} from [B, 2] row (loss sum, tokens) and the batch's samples,
    summed in float64 in batch order (so every rank, holding the same rows, gets the same bits)."""
    if len(samples) != len(row_losses):
        raise ValueError(f"{len(row_losses)} row losses for a batch of {len(samples)} samples")
    sums: dict[str, list[float]] = {}
    for (name, _), (loss, tokens) in zip(samples, row_losses.tolist()):
        acc = sums.setdefault(name, [0.0, 0.0])
        acc[0] += loss
        acc[1] += tokens
    return {name: (loss, tokens) for name, (loss, tokens) in sorted(sums.items())}


def loss_per_dataset(row_losses: torch.Tensor, samples: list[tuple[str, int]]) -> dict[str, float]:
    """{dataset: mean token loss over its rows} from [B, 2] row (loss sum, tokens) and the batch's samples."""
    return means(sums_per_dataset(row_losses, samples))


def means(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{dataset: loss sum / tokens} of the datasets with tokens."""
    return {name: loss / tokens for name, (loss, tokens) in sums.items() if tokens > 0}


class TokenBytes:
    """UTF-8 bytes each token id stands for under a SentencePiece tokenizer (byte fallback, identity normalizer).

    A piece counts its characters with the visible space as one byte, a byte-fallback piece one byte, control,
    special and padding ids none. SentencePiece prepends one space to every document (the dummy prefix) and
    decoding drops it, so a document's first token counts one byte less: over a whole document the sum equals
    the bytes of its text.
    """

    def __init__(self, tokenizer):
        sp = tokenizer._sp
        table = np.zeros(tokenizer.padded_vocab_size, dtype=np.int64)
        for i in range(tokenizer.base_vocab_size):
            if sp.is_byte(i):
                table[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
                table[i] = len(sp.id_to_piece(i).replace(SPACE, " ").encode("utf-8"))
        self.table = table
        self.eos_id = tokenizer.eos_id
        self.dummy_prefix = sp.encode("a", out_type=str)[0].startswith(SPACE)
        self.leading_space = np.array([sp.id_to_piece(i).startswith(SPACE) if i < tokenizer.base_vocab_size
                                       else False for i in range(tokenizer.padded_vocab_size)])

    def label_bytes(self, rows: torch.Tensor | np.ndarray) -> int:
        """Bytes of the labels (tokens 1..S) of [n, S+1] rows cut from a stream of EOS-terminated documents."""
        rows = np.asarray(rows, dtype=np.int64)
        labels, inputs = rows[:, 1:], rows[:, :-1]
        total = int(self.table[labels].sum())
        if self.dummy_prefix:
            total -= int((self.leading_space[labels] & (inputs == self.eos_id)).sum())
        return total


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Bits per UTF-8 byte of a summed NLL in nats."""
    return nll_nats / (math.log(2) * num_bytes) if num_bytes > 0 else float("nan")


def token_bytes_for(config) -> TokenBytes | None:
    """The TokenBytes of a run's tokenizer, or None when the run has none (synthetic data)."""
    if config.data.source != "indexed":
        return None
    from ..data.pipeline import tokenizer_path
    from ..data.tokenizer import CrystalTokenizer

    return TokenBytes(CrystalTokenizer.load(tokenizer_path(config), padded_vocab_size=config.model.vocab_size))
