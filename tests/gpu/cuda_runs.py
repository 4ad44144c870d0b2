"""The rank function of the CUDA parity tests: one tiny Crystal trained per setting, in one NCCL process group."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

from megacrystal.config import config_from_dict
from megacrystal.train.loop import train

from ..engines.parallel_runs import TINY, _with


def losses_on_cuda(settings: dict[str, dict]) -> dict[str, dict]:
    """name -> {loss, grad_norm per step, backend, device, peak memory} for each setting (dotted overrides)."""
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # as the runtime will: memory stats of this rank's GPU
    results = {}
    for name, overrides in settings.items():
        torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as run_dir:
            records = train(config_from_dict(_with({**overrides, "run.dir": run_dir})))
        results[name] = {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
                         "backend": dist.get_backend(), "device": str(torch.cuda.current_device()),
                         "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    return results
