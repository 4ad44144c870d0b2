"""Process groups and parallel layout: gloo on CPU, NCCL on GPU; one process or many under torchrun."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import Config


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """The world size torchrun/SLURM launched us with (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """An unused TCP port on localhost (for single-process and test rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dist_timeout() -> timedelta | None:
    """$MEGACRYSTAL_DIST_TIMEOUT_S: how long a collective waits for a peer before the run fails (torch's default
    when unset); multi-node launches lower it so a lost node fails the run in seconds, not half an hour."""
    value = os.environ.get("MEGACRYSTAL_DIST_TIMEOUT_S")
    return timedelta(seconds=float(value)) if value else None


def init_process_group() -> None:
    """Join (or create, for a single process) the default process group; idempotent."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `megacrystal train`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=dist_timeout())


def configure_cpu(requested_threads: int | None) -> None:
    """Split the machine's cores among the ranks on this node unless the config says otherwise, and flush
    denormal floats to zero: a matmul over denormals (softmax gradients of confident logits) runs several times
    slower on x86 CPUs; GPUs' matmul units flush them too."""
    if torch.cuda.is_available():
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = requested_threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def setup_parallel(config: Config) -> Layout:
    """Initialise torch.distributed, the CPU workarounds and megatron-core's model-parallel groups."""
    config.data_parallel_size(world_size_from_env())  # fail on a bad layout before any process group
    init_process_group()
    from . import cpu_compat

    cpu_compat.install(verbose=cpu_compat.debug_requested() and dist.get_rank() == 0)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    p = config.parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    timeout = dist_timeout()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        distributed_timeout_minutes=timeout.total_seconds() / 60 if timeout else 30,
    )
    model_parallel_cuda_manual_seed(config.train.seed)
    configure_cpu(config.train.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Layout(
        rank=dist.get_rank(), world_size=dist.get_world_size(), tp=p.tp, pp=p.pp,
        dp=ps.get_data_parallel_world_size(), vpp=p.vpp,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), device=device,
    )


def teardown_parallel() -> None:
    """Destroy megatron's model-parallel groups (the default process group stays for reuse)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
