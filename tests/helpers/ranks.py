"""Run a function on N real torch.distributed (gloo) ranks in spawned processes and collect the results."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - the parent re-raises with this rank's traceback
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Call `fn(*args)` on ranks 0..world_size-1 (env set as torchrun would); return results by rank.

    `fn` must be importable (module level) and its result picklable. The function initialises the process
    group itself (megacrystal's runtime does it from the environment), so the code under test is the code
    that runs in production.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    # Not daemonic: megatron's checkpoint writer starts a multiprocessing Manager in each rank.
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, args, results))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    collected: dict[int, object] = {}
    try:
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{world_size - len(collected)} rank(s) gave no result in {timeout}s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            collected[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [collected[rank] for rank in range(world_size)]
