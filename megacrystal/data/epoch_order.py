"""A keyed pseudo-random permutation of one dataset's samples for one epoch (the blended sampler's order)."""
from __future__ import annotations

import hashlib

import numpy as np

_FEISTEL_ROUNDS = 6

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a cheap, well-mixed 64-bit hash (uint64 arrays wrap on overflow)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


class _EpochOrder:
    """A keyed pseudo-random permutation of range(size): a Feistel network with cycle walking.

    Why not `rng.permutation(size)`: a materialized order costs 4-8 bytes per sample on every rank (Crystal's
    CommonCrawl half alone is ~90M samples), and numpy does not promise that a Generator's stream stays the
    same across versions, which would silently change the order of a resumed run. This is O(1) memory,
    computes any position directly, and depends only on integer arithmetic.
    """

    def __init__(self, size: int, seed: int, dataset: str, epoch: int) -> None:
        bits = max(2, (size - 1).bit_length())
        self._half = np.uint64((bits + 1) // 2)
        self._mask = np.uint64((1 << int(self._half)) - 1)
        self._size = size
        self.epoch = epoch
        # blake2b, not hash(): Python salts str hashes per process, so ranks and restarts would disagree.
        digest = hashlib.blake2b(f"{seed}\0{dataset}\0{epoch}".encode(), digest_size=8 * _FEISTEL_ROUNDS).digest()
        self._keys = [np.uint64(int.from_bytes(digest[8 * i: 8 * i + 8], "little")) for i in range(_FEISTEL_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices at `positions` of this epoch's order."""
        x = self._encrypt(positions.astype(np.uint64))
        # The Feistel domain is a power of 4 < 4 * size; walking the cycle until back in range is a bijection.
        outside = x >= self._size
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= self._size
        return x.astype(np.int64)


def epoch_order(size: int, seed: int, dataset: str, epoch: int) -> list[int]:
    """The full sample order of one dataset epoch (for tests and tools; the sampler never materializes it)."""
    return _EpochOrder(size, seed, dataset, epoch)(np.arange(size, dtype=np.uint64)).tolist()
