"""Where global batches come from: one interface over the synthetic stream and the phase-blended datasets."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..schedule.plan import RunPlan
from .blend import BlendedSampler
from .errors import DataError
from .fim import fim_rng, fim_sample
from .synthetic import SyntheticTokens


@dataclass
class GlobalBatch:
    """Token rows [B, S+1], the label loss mask [B, S], and which (dataset, sample) each row is."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    samples: list[tuple[str, int]]
    counts: dict[str, int] = field(default_factory=dict)  # rows per dataset
    blend_weights: dict[str, float] | None = None  # the weights it was drawn with, in a phase mixing online


class TokenStream:
    """A prepared split read as one token stream, cut into overlapping (S+1)-token samples every S tokens.

    The split's shards (`.bin` files, in order) are one stream: a sample may span two shards. Documents are
    packed across sample boundaries with EOS between them and no per-document attention reset, as Crystal's
    data was. `fingerprint` says what the dataset was made from (checked when a run resumes).
    """

    def __init__(self, bin_paths, dtype: np.dtype, seq_length: int, fingerprint: str = "",
                 allow_change: bool = False):
        paths = [bin_paths] if isinstance(bin_paths, (str, bytes)) or hasattr(bin_paths, "__fspath__") \
            else list(bin_paths)
        self._parts = [np.memmap(p, dtype=dtype, mode="r") if os.path.getsize(p) else np.zeros(0, dtype)
                       for p in paths]
        self._starts = np.cumsum([0] + [len(p) for p in self._parts])
        self.num_tokens = int(self._starts[-1])
        self.seq_length = seq_length
        self.num_samples = max(0, (self.num_tokens - 1) // seq_length)
        self.fingerprint, self.allow_change = fingerprint, allow_change

    @property
    def tokens(self) -> np.ndarray:
        """All tokens (a view for one shard, a copy for several)."""
        return self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)

    def _slice(self, start: int, stop: int) -> np.ndarray:
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        out = []
        while start < stop and i < len(self._parts):
            local = start - self._starts[i]
            piece = self._parts[i][local:local + (stop - start)]
            out.append(np.asarray(piece, dtype=np.int64))
            start += len(piece)
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out) if out else np.zeros(0, np.int64)

    def sample(self, index: int) -> np.ndarray:
        start = index * self.seq_length
        return self._slice(start, start + self.seq_length + 1)

    def first_samples(self, count: int) -> np.ndarray:
        """The first `count` samples, repeating the stream if it is shorter (tiny validation splits)."""
        need = count * self.seq_length + 1
        stream = self._slice(0, min(need, self.num_tokens))
        if len(stream) < need:
            stream = np.resize(stream, need)
        return np.stack([stream[i * self.seq_length:(i + 1) * self.seq_length + 1] for i in range(count)])


class SyntheticSource:
    """The synthetic Markov stream under the RunPlan interface (one dataset, `synthetic`)."""

    def __init__(self, vocab_size: int, seq_length: int, plan: RunPlan, seed: int):
        self.stream = SyntheticTokens(vocab_size, seq_length, seed)
        self.plan = plan
        self.consumed = 0

    def global_batch(self, step: int) -> GlobalBatch:
        batch = self.plan.global_batch_size
        tokens = self.stream.global_batch(step, batch)
        self.consumed += batch
        return GlobalBatch(tokens, torch.ones(batch, tokens.shape[1] - 1), [("synthetic", step * batch + i)
                                                                            for i in range(batch)],
                           {"synthetic": batch})

    def consumed_samples(self) -> dict[str, int]:
        return {"synthetic": self.consumed}

    def observe(self, step: int, sums) -> None:
        """One stream has no blend to adapt."""
        return None

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


class BlendedSource:
    """Global batches drawn by the phase-aware BlendedSampler from prepared datasets, with FIM on code."""

    def __init__(self, streams: dict[str, TokenStream], fim_datasets: set[str], plan: RunPlan, seed: int,
                 eos_id: int, fim_ids: dict[str, int]):
        self.streams, self.fim_datasets, self.plan = streams, fim_datasets, plan
        self.seed, self.eos_id, self.fim_ids = seed, eos_id, fim_ids
        self.sampler = BlendedSampler({name: s.num_samples for name, s in streams.items()}, plan, seed)

    def global_batch(self, step: int) -> GlobalBatch:
        _, phase, _ = self.plan.phase_at_step(step)
        before = self.sampler.consumed_samples()
        samples = self.sampler.global_batch(step)
        seen: dict[str, int] = {}
        rows, masks = [], []
        for name, index in samples:
            tokens = self.streams[name].sample(index)
            mask = np.ones(len(tokens), dtype=np.float32)
            if name in self.fim_datasets and phase.fim_rate > 0:
                # The k-th draw of a dataset in the run belongs to epoch k // size: a fresh FIM every epoch.
                draw = before.get(name, 0) + seen.get(name, 0)
                epoch = draw // self.streams[name].num_samples
                rng = fim_rng(_dataset_seed(self.seed, name), epoch, index)
                tokens, mask, _ = fim_sample(tokens, self.eos_id, phase.fim_rate, rng, self.fim_ids)
            seen[name] = seen.get(name, 0) + 1
            rows.append(tokens)
            masks.append(mask[1:])  # the mask of each label (the next token)
        return GlobalBatch(torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks)), samples, seen,
                           self.sampler.mixing_weights)

    def observe(self, step: int, sums: dict[str, tuple[float, float]] | None) -> dict[str, float] | None:
        """Step `step`'s (loss sum, tokens) per dataset for online mixing; the new weights after an update."""
        return self.sampler.observe(step, sums)

    def consumed_samples(self) -> dict[str, int]:
        return self.sampler.consumed_samples()

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "fingerprints": {n: s.fingerprint for n, s in self.streams.items()}}

    def load_state_dict(self, state: dict):
        """Restore the sampler; a dataset changed since the checkpoint stops the run unless allowed."""
        saved = state.get("fingerprints", {})
        changed = [n for n, s in self.streams.items() if n in saved and saved[n] != s.fingerprint]
        allowed = all(self.streams[n].allow_change for n in changed)
        if changed and not allowed:
            sizes = {n: state["datasets"].get(n, {}).get("size") for n in changed}
            what = ", ".join(f"'{n}' ({sizes[n]} -> {self.streams[n].num_samples} samples)" for n in changed)
            raise DataError(f"dataset {what} changed since the checkpoint (prepared again from other inputs or "
                            f"options); resume with --allow-data-change to continue its sampling from the "
                            f"recorded cursors, or start a fresh run")
        state = {k: v for k, v in state.items() if k != "fingerprints"}
        return self.sampler.load_state_dict(state, allow_size_change=set(changed))


def _dataset_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
