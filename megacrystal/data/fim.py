"""Fill-in-the-middle (FIM) on token ids, the way Crystal's StarCoder data was transformed (crystal-spec §3.4).

Layouts, exactly as LLM360's fim_hdf5_stage{2,3}.py (adapted from gpt-neox) build them:
  PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
  SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle
SPM is the "variant 2" of the FIM paper that StarCoder/BigCode and Crystal use: the prefix sits right before the
middle, so the model continues the prefix naturally; Crystal picked it with probability 0.5 (the card's SPM rate).

One deliberate difference: Crystal decoded each document to text and cut it at two character positions; we cut
the token ids at two token positions. That avoids a decode/re-encode per document in the data loader and keeps
every other token of the document unchanged; the distribution of cut points differs only in granularity.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

FIM_KEYS = ("prefix", "middle", "suffix", "pad")
SENTINELS = 3  # a transformed document gains <fim_prefix>, <fim_suffix> and <fim_middle>


class FimResult(NamedTuple):
    """Transformed tokens, their loss mask (0 on <fim_pad>) and the layout used ("psm", "spm" or "none")."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    mode: str


def fim_rng(seed: int, epoch: int, doc_index: int) -> np.random.Generator:
    """A generator determined by (seed, epoch, document index): each epoch draws a fresh FIM, as Crystal did."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, doc_index]))


def _fit(tokens: np.ndarray, length: int | None, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncate the end or pad with <fim_pad> (loss mask 0) to `length`; None keeps the length."""
    n = len(tokens)
    if length is None or length == n:
        return tokens, np.ones(n, dtype=np.float32)
    if n > length:
        return tokens[:length], np.ones(length, dtype=np.float32)
    padded = np.concatenate([tokens, np.full(length - n, pad_id, dtype=tokens.dtype)])
    mask = np.concatenate([np.ones(n, dtype=np.float32), np.zeros(length - n, dtype=np.float32)])
    return padded, mask


def apply_fim(tokens, rate: float, rng: np.random.Generator, fim_ids: Mapping[str, int], spm_rate: float = 0.5,
              length: int | None = None) -> FimResult:
    """With probability `rate`, turn one document (no EOS) into PSM or SPM; optionally fit it to `length`."""
    missing = [k for k in FIM_KEYS if k not in fim_ids]
    if missing:
        raise KeyError(f"fim_ids lacks {missing}; pass CrystalTokenizer.fim_ids")
    tokens = np.asarray(tokens, dtype=np.int64)
    # Draw order follows Crystal's permute(): apply?, then the two cuts, then the layout.
    if rng.random() >= rate:
        return FimResult(*_fit(tokens, length, fim_ids["pad"]), "none")
    lo, hi = np.sort(rng.integers(0, len(tokens) + 1, size=2))
    prefix, middle, suffix = tokens[:lo], tokens[lo:hi], tokens[hi:]
    spm = rng.random() < spm_rate
    if length is not None:
        over = len(tokens) + SENTINELS - length
        if over > 0:
            # Crystal trims the suffix to stay in length, and leaves a document whose suffix is too short as is.
            if len(suffix) <= over:
                return FimResult(*_fit(tokens, length, fim_ids["pad"]), "none")
            suffix = suffix[: len(suffix) - over]
    p, m, s = (np.array([fim_ids[k]], dtype=np.int64) for k in ("prefix", "middle", "suffix"))
    if spm:
        out = np.concatenate([p, s, suffix, m, prefix, middle])
    else:
        out = np.concatenate([p, prefix, s, suffix, m, middle])
    return FimResult(*_fit(out, length, fim_ids["pad"]), "spm" if spm else "psm")


def fim_sample(sample, eos_id: int, rate: float, rng: np.random.Generator, fim_ids: Mapping[str, int],
               spm_rate: float = 0.5, length: int | None = None) -> FimResult:
    """FIM on a packed sample: each EOS-separated document independently, then truncate/pad the whole sample.

    This is Crystal's fim() on a 2048-token sample: documents keep their EOS, the sample grows by 3 tokens per
    transformed document and is cut back to `length` (default: its own length), padding with <fim_pad> at mask 0.
    """
    sample = np.asarray(sample, dtype=np.int64)
    target = len(sample) if length is None else length
    pieces, start, modes = [], 0, []
    ends = np.flatnonzero(sample == eos_id)
    for end in [*ends.tolist(), len(sample)]:
        if end > start:
            result = apply_fim(sample[start:end], rate, rng, fim_ids, spm_rate)
            pieces.append(result.tokens)
            modes.append(result.mode)
        if end < len(sample):
            pieces.append(np.array([eos_id], dtype=np.int64))
        start = end + 1
    joined = np.concatenate(pieces) if pieces else sample[:0]
    tokens, mask = _fit(joined, target, fim_ids["pad"])
    used = sorted({m for m in modes if m != "none"})
    return FimResult(tokens, mask, "+".join(used) if used else "none")
