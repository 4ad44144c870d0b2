"""Rank functions for test_shm_reduce.py (spawned: module level, importable)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megacrystal.distributed import shm_reduce
from megacrystal.distributed.runtime import init_process_group


def reduce_twice(numel: int) -> dict:
    """Two all-reduces through one reducer (two steps' gradients); each rank's inputs and results (as lists:
    tensors would cross the result queue as shared memory of a process that is gone)."""
    init_process_group()
    group = dist.new_group(list(range(dist.get_world_size())))
    reducer = shm_reduce.SharedMemoryAllReduce(group, numel, torch.float32)
    out = {"inputs": [], "results": [], "usable": shm_reduce.usable(group, 4 * numel)}
    for step in range(2):
        values = torch.randn(numel, generator=torch.Generator().manual_seed(100 * step + dist.get_rank()))
        reducer.buffer.copy_(values)
        reducer.all_reduce()
        out["inputs"].append(values.tolist())
        out["results"].append(reducer.buffer.tolist())
    out["files_left"] = sorted(p.name for p in shm_reduce.SHM_DIR.glob("megacrystal-grads-*"))
    dist.destroy_process_group()
    return out
