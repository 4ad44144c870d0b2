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


REQUIRE_CUDA_ENV = "MEGACRYSTAL_REQUIRE_CUDA"  # set by GPU job scripts: `auto` then means `cuda`


def resolve_device(requested: str = "auto") -> torch.device:
    """The device this process trains on, from `train.device` (auto: this rank's GPU when torch sees one, else the
    CPU): with GPUs, one process per GPU, LOCAL_RANK picks it. A CPU-only torch build always gives the CPU."""
    from ..config import ConfigError

    field = "train.device: cuda"
    if requested == "auto" and os.environ.get(REQUIRE_CUDA_ENV) == "1":
        # a GPU job (launch slurm --gpus-per-node N) must not fall back to the CPU when its torch sees no GPU
        requested, field = "cuda", f"train.device: auto in a GPU job ({REQUIRE_CUDA_ENV}=1)"
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        if requested == "cpu" and torch.cuda.is_available():
            # megatron-core and the CPU workarounds (cpu_compat) key on torch.cuda.is_available(): a CPU run on a
            # GPU host must not see the GPUs at all, and only the environment can hide them from torch.
            raise ConfigError("train.device: cpu, but this process sees CUDA GPUs; start it with "
                              "CUDA_VISIBLE_DEVICES= (empty) to train on the CPU, or set train.device: auto")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"{field}, but torch {torch.__version__} ({build}) sees no GPU; run on a GPU "
                          "node with a CUDA torch (bash launch/setup_env.sh --cuda), or set train.device: cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"train.device: LOCAL_RANK {local_rank} but this node has {count} visible GPU(s); "
                          f"launch one process per GPU (--nproc-per-node {count} or less)")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The collective backend of a device: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device | None = None) -> None:
    """Join (or create, for a single process) the default process group on `device` (default: what
    resolve_device("auto") picks); idempotent."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `megacrystal train`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = device or resolve_device("auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts: otherwise every rank of a node opens GPU 0
    dist.init_process_group(backend=backend_for(device), timeout=dist_timeout())


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
    device = resolve_device(config.train.device)  # a CUDA run without a GPU fails here, in one line
    init_process_group(device)
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
