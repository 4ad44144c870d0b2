"""`megacrystal score`: the mean next-token NLL of a token sequence under a checkpoint, at any parallel layout.

The sequence is cut into non-overlapping windows of the model's sequence length: window k feeds tokens
[kS, kS+S) at positions 0..S-1 (no context carried over) and is scored on each input's next token, so every
token but the first is predicted exactly once. A last, shorter window is padded and its padding masked; causal
attention keeps the padding from touching the scored positions. `tokens` in the result is the number of scored
(predicted) tokens.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..data.errors import DataError


def read_tokens_file(path: str | Path) -> list[int]:
    """A JSON file holding one list of token ids."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--tokens-file {p}: no such file")
    try:
        tokens = json.loads(p.read_text())
    except ValueError:
        tokens = None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise DataError(f"--tokens-file {p}: expected one JSON list of integer token ids")
    return tokens


def tokenizer_model_path(config, tokenizer: str | None) -> Path:
    """--tokenizer (a SentencePiece .model, or a directory holding tokenizer.model), else the run's tokenizer."""
    if tokenizer is not None:
        p = Path(tokenizer)
        return p / "tokenizer.model" if p.is_dir() else p
    t = config.data.tokenizer
    return Path(t.model) if t.model else Path(config.data.dir.format(name=config.run.name)) / "tokenizer.model"


def encode_text(path: str | Path, tokenizer_model: Path, vocab_size: int) -> list[int]:
    """The token ids of a UTF-8 text file under the run's tokenizer (no BOS/EOS added)."""
    from ..data.tokenizer import CrystalTokenizer

    p = Path(path)
    if not p.is_file():
        raise DataError(f"--text-file {p}: no such file")
    tokenizer = CrystalTokenizer.load(tokenizer_model, padded_vocab_size=vocab_size)
    return tokenizer.encode(p.read_text(encoding="utf-8"))


def windows(tokens: list[int], seq_length: int, rows_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[W, S+1] token rows and [W, S] loss masks of the scoring windows, W padded to a multiple of rows_multiple."""
    n = len(tokens)
    if n < 2:
        raise DataError(f"scoring needs at least 2 tokens, got {n}")
    count = math.ceil((n - 1) / seq_length)
    count = math.ceil(count / rows_multiple) * rows_multiple
    rows = torch.zeros(count, seq_length + 1, dtype=torch.int64)
    mask = torch.zeros(count, seq_length, dtype=torch.float32)
    ids = torch.tensor(tokens, dtype=torch.int64)
    for k in range(count):
        piece = ids[k * seq_length:k * seq_length + seq_length + 1]
        if len(piece) < 2:
            break
        rows[k, :len(piece)] = piece
        mask[k, :len(piece) - 1] = 1.0
    return rows, mask


def check_ids(tokens: list[int], vocab_size: int, where: str) -> None:
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise DataError(f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")


def score(checkpoint: str | Path, tokens: list[int], tp: int = 1, pp: int = 1, micro_batch_size: int = 1,
          precision: str = "fp32", where: str = "tokens") -> dict:
    """{"tokens": scored tokens, "nll": mean NLL} of `tokens` under a checkpoint (collective)."""
    from ..data.batches import rank_microbatches
    from ..distributed.runtime import setup_parallel, teardown_parallel
    from .gather import (ENGINE_DIR, checkpoint_config, engine_kind, gather_deepspeed, layout_config,
                         load_global_into, load_weights, resolve_checkpoint)
    from .writer import check_world

    ckpt = resolve_checkpoint(checkpoint)
    config = checkpoint_config(ckpt)
    kind = engine_kind(ckpt)
    check_ids(tokens, config.model.vocab_size, where)
    world = check_world(tp, pp)
    run = layout_config(config, tp, pp, world, precision)
    layout = setup_parallel(run)
    try:
        from ..engines.megatron import MegatronEngine

        engine = MegatronEngine(run, layout)
        chunks = [chunk.module for chunk in engine.model]
        if kind == "megatron":
            load_weights(chunks, ckpt / ENGINE_DIR)
        else:
            weights, _ = gather_deepspeed(ckpt, config)
            load_global_into(chunks, weights.__getitem__, run.model)
        rows, mask = windows(tokens, run.model.seq_length, layout.dp * micro_batch_size)
        microbatches = rank_microbatches(rows, layout.dp_rank, layout.dp, micro_batch_size, mask)
        loss_sum, count = engine.eval_loss(microbatches)
    finally:
        teardown_parallel()
    return {"tokens": count, "nll": loss_sum / count}
