"""Ordered, bounded parallel maps for the data passes: threads for tokenizing, processes for MinHash.

sentencepiece releases the GIL while it encodes, so tokenizer threads in one process use every core with no
pickling of texts or token arrays; MinHash signatures are Python work that holds the GIL, so dedup forks
processes. Both keep a bounded number of items in flight (`multiprocessing.Pool.imap` and `Executor.map` read
their whole input ahead, which would hold a corpus in memory).
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def _bounded(submit: Callable, items: Iterable, in_flight: int) -> Iterator:
    pending = collections.deque()
    for item in items:
        pending.append(submit(item))
        if len(pending) >= in_flight:
            yield pending.popleft()
    yield from pending


class ThreadPool:
    """fn over items in `workers` threads, results in input order.

    Up to `ahead` items per worker are in flight: results come back in order, so one slow item (a multi-MB
    source file is one document) would otherwise leave the other threads idle until it is done.
    """

    def __init__(self, workers: int, fn: Callable, ahead: int = 16):
        self.workers, self.fn, self.ahead = workers, fn, ahead
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")

    def map(self, items: Iterable) -> Iterator:
        """fn(item) for each item, in order."""
        for future in _bounded(lambda item: self._pool.submit(self.fn, item), items, self.ahead * self.workers):
            yield future.result()

    def close(self) -> None:
        """Stop the threads (queued items are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class ProcessPool:
    """fn over items in `workers` forked processes (in this process when workers is 1), in input order."""

    def __init__(self, workers: int, fn: Callable, initializer: Callable, initargs: tuple):
        self.workers, self.fn = workers, fn
        self._pool = None
        initializer(*initargs)
        if workers > 1:
            # fork: workers inherit the state without pickling it, and callers need no __main__ guard.
            ctx = mp.get_context("fork" if sys.platform == "linux" else None)
            self._pool = ctx.Pool(workers, initializer=initializer, initargs=initargs)

    def map(self, items: Iterable) -> Iterator:
        """fn(item) for each item, in order."""
        if self._pool is None:
            yield from map(self.fn, items)
            return
        for result in _bounded(lambda item: self._pool.apply_async(self.fn, (item,)), items, 2 * self.workers):
            yield result.get()

    def close(self) -> None:
        """Stop the workers."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
