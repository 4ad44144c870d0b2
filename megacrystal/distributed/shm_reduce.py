"""The data-parallel gradient all-reduce through shared memory, when every data-parallel rank is on this host (CPU).

gloo all-reduces over TCP even between processes on one host: every byte is copied into the kernel and out again,
and its threads take that CPU from the backward they overlap (docs/benchmarks/README.md has the cost). Here megatron's
gradient buffer of each rank is one slot of a shared-memory file (in /dev/shm, unlinked as soon as every rank
has mapped it, before the first step: a crashed run leaves nothing behind). After backward each rank sums its 1/W of the
buffer over all slots, in place in its own slot, and then copies the other ranks' sums from theirs: about three
passes over the buffer, no copy through the kernel, at the cost of reducing after backward instead of during it.
Every rank ends with the same bits (each slice is summed once, by its owner).

Used with megatron DDP when the engine runs on a CPU with more than one data-parallel rank, without the
distributed optimizer (which reduce-scatters), and `parallel.shared_memory_grad_reduce` is on (the default).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel

SHM_DIR = Path("/dev/shm")
_ALIGN = 16  # elements: slices start on 64-byte boundaries


def host_identity() -> str:
    """Processes that can share memory and count as one host: one kernel boot, one mount namespace (one /dev/shm)
    and one network namespace (the test hosts of launch/netns.py are separate hosts on one kernel)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    spaces = [os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("mnt", "net")]
    return f"{boot}:{spaces[0]}:{spaces[1]}"


def usable(group, grad_bytes: int) -> bool:
    """Whether all ranks of `group` share this host and /dev/shm holds a slot for each (collective over the
    world: every rank gets the same answer, so none waits in a gloo all-reduce that the others skip)."""
    hosts = [None] * group.size()
    dist.all_gather_object(hosts, host_identity(), group=group)
    try:
        room = os.statvfs(SHM_DIR)
        fits = room.f_bavail * room.f_frsize > 1.25 * group.size() * grad_bytes
    except OSError:
        fits = False
    ok = torch.tensor([int(fits and len(set(hosts)) == 1)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class SharedMemoryAllReduce:
    """Sum a 1-D float buffer over the ranks of `group` through one shared file with a slot per rank."""

    def __init__(self, group, numel: int, dtype: torch.dtype):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        name = [f"megacrystal-grads-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        path = SHM_DIR / name[0]
        element = torch.empty((), dtype=dtype).element_size()
        try:
            if self.rank == 0:  # sized once; the others map what rank 0 made
                with open(path, "wb") as file:
                    file.truncate(self.size * numel * element)
            dist.barrier(group=group)
            whole = torch.from_file(str(path), shared=True, size=self.size * numel, dtype=dtype)
            dist.barrier(group=group)
        finally:
            if self.rank == 0:
                path.unlink(missing_ok=True)  # every rank has it mapped (or failed): the name is no longer needed
        self.slots = [whole[r * numel:(r + 1) * numel] for r in range(self.size)]
        step = -(-numel // (self.size * _ALIGN)) * _ALIGN
        self.slices = [slice(min(r * step, numel), min((r + 1) * step, numel)) for r in range(self.size)]

    @property
    def buffer(self) -> torch.Tensor:
        """This rank's slot: the tensor to reduce."""
        return self.slots[self.rank]

    def all_reduce(self) -> None:
        mine, own = self.buffer, self.slices[self.rank]
        dist.barrier(group=self.group)  # every slot holds its rank's gradients
        for r in range(self.size):
            if r != self.rank:
                mine[own] += self.slots[r][own]
        dist.barrier(group=self.group)  # every slice is summed in its owner's slot
        for r in range(self.size):
            if r != self.rank:
                mine[self.slices[r]] = self.slots[r][self.slices[r]]
        dist.barrier(group=self.group)  # nobody reads this slot any more: the next backward may write it


def reduce_through_shared_memory(ddp: DistributedDataParallel, group) -> None:
    """Move one megatron DDP model chunk's gradient buffers into shared slots and make its finish_grad_sync (what
    finalize_model_grads calls) reduce them there. The DDP must have been built without overlap_grad_reduce (no
    bucket all-reduce is started during backward) and without the distributed optimizer."""
    assert not ddp.ddp_config.overlap_grad_reduce and not ddp.ddp_config.use_distributed_optimizer
    assert not ddp.expert_parallel_buffers
    reducers = []
    for buffer in ddp.buffers:
        reducer = SharedMemoryAllReduce(group, buffer.grad_data.numel(), buffer.grad_data.dtype)
        reducer.buffer.copy_(buffer.grad_data)
        # Every view of the old buffer is re-made over the slot: the buffer, each bucket, each param's main_grad.
        buffer.grad_data = reducer.buffer
        for bucket in buffer.buckets:
            bucket.grad_data = reducer.buffer[bucket.offset:bucket.offset + bucket.grad_data.numel()]
        for param, (start, end, _) in buffer.param_index_map.items():
            param.main_grad = reducer.buffer[start:end].view(param.data.shape)
        reducers.append((buffer, reducer))

    def finish_grad_sync(force_all_reduce: bool = False):
        for buffer, reducer in reducers:
            for bucket in buffer.buckets:  # megatron scales before its collective (1.0 with per-token loss)
                if bucket.gradient_scaling_factor != 1.0:
                    bucket.grad_data *= bucket.gradient_scaling_factor
            reducer.all_reduce()

    ddp.finish_grad_sync = finish_grad_sync
