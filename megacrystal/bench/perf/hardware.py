"""Devices, links and the model's free constants (the ones `bench --calibrate` fits).

Device figures are the vendors' data-sheet values: dense peak (the "with sparsity" figures are twice these),
memory, HBM bandwidth, and the NVLink bandwidth one GPU has in each direction. Links are bytes per second per
device: a node's network is shared by its devices, so per-node figures are divided by devices per node.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ...config import ConfigError
from ..peaks import DEVICE_PEAKS_TFLOPS


@dataclass(frozen=True)
class Device:
    """One accelerator: dense peak at the run's precision, memory, memory bandwidth, default links."""

    name: str
    peak_tflops: float
    memory_gb: float
    hbm_gbytes_s: float
    nvlink_gbytes_s: float  # per GPU, each direction, to the other GPUs of its node
    nic_gbits_s: float  # per GPU: the usual node has one NIC per GPU


# memory GB, HBM GB/s, NVLink GB/s per direction, NIC Gb/s per GPU (DGX-style nodes)
_DEVICE_EXTRAS = {
    "H100 SXM": (80, 3350, 450, 400),
    "H100 PCIe": (80, 2000, 300, 400),
    "H200": (141, 4800, 450, 400),
    "A100": (80, 2039, 300, 200),
    "A100 40GB": (40, 1555, 300, 200),
    "L40S": (48, 864, 32, 200),  # no NVLink: PCIe 4 x16
    "A10G": (24, 600, 32, 100),
    "V100": (32, 900, 150, 100),
    "MI300X": (192, 5300, 448, 400),
}


def device(name: str, precision: str = "bf16") -> Device:
    """The named device of the peak table, or a one-line error listing the names."""
    peaks = DEVICE_PEAKS_TFLOPS.get("A100" if name == "A100 40GB" else name)
    if peaks is None or name not in _DEVICE_EXTRAS or not peaks.get(precision):
        known = ", ".join(n for n in _DEVICE_EXTRAS if DEVICE_PEAKS_TFLOPS.get(n.replace(" 40GB", ""), {})
                          .get(precision))
        raise ConfigError(f"--device {name!r}: unknown or without {precision} peak; choose one of {known}")
    memory, hbm, nvlink, nic = _DEVICE_EXTRAS[name]
    return Device(name, peaks[precision], memory, hbm, nvlink, nic)


@dataclass(frozen=True)
class Cluster:
    """Where a step runs: nodes of identical devices, the link inside a node and the network between nodes."""

    device: Device
    nodes: int
    devices_per_node: int
    intra_gbytes_s: float  # per device, each direction
    inter_gbits_s_per_device: float  # a node's network divided by its devices

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class Constants:
    """The model's free constants: what a measured run can correct (see `calibrate.py`).

    GEMM efficiency follows a saturating curve in each dimension, eff = gemm_max x prod(d / (d + gemm_half_dim)):
    a tensor-core GEMM reaches most of its plateau once every dimension is a few hundred elements, and loses
    efficiency on thin shapes (small head dims, small TP shards). Memory-bound work (element-wise, optimizer) runs
    at hbm_efficiency of the HBM bandwidth; collectives at link_efficiency of the link plus a latency each.
    """

    gemm_max: float = 0.80
    gemm_half_dim: float = 48.0
    attention_efficiency: float = 0.45  # fused (flash) attention, forward and backward together
    hbm_efficiency: float = 0.70
    intra_link_efficiency: float = 0.75
    inter_link_efficiency: float = 0.80
    collective_latency_s: float = 20e-6
    tp_comm_overlap: float = 0.0  # share of TP communication hidden behind GEMMs (megatron --tp-comm-overlap)
    overlap_slowdown: float = 0.03  # compute lost to communication kernels running beside it
    step_overhead_s: float = 0.0  # per step: data loading, logging, launch gaps the terms do not cover
    source: str = "defaults"

    def with_(self, **changes) -> "Constants":
        """A copy with some constants changed."""
        return replace(self, **changes)


# Per generation: Hopper's larger tensor-core tiles need larger GEMMs to reach their plateau, and its plateau
# sits lower against the data-sheet peak (power and clock limits under sustained load) than Ampere's. Set by
# hand from the validation table (docs/benchmarks/throughput-validation.md): in-sample, and said so there.
DEVICE_CONSTANTS = {
    "H100 SXM": {"gemm_max": 0.72, "gemm_half_dim": 256.0, "attention_efficiency": 0.40, "tp_comm_overlap": 0.5},
    "H200": {"gemm_max": 0.72, "gemm_half_dim": 256.0, "attention_efficiency": 0.40, "tp_comm_overlap": 0.5},
    "H100 PCIe": {"gemm_max": 0.72, "gemm_half_dim": 256.0, "attention_efficiency": 0.40, "tp_comm_overlap": 0.5},
    "A100": {"gemm_max": 0.76},
    "A100 40GB": {"gemm_max": 0.76},
}


def default_constants(device_name: str) -> Constants:
    """The constants for a device before any calibration."""
    return Constants(**DEVICE_CONSTANTS.get(device_name, {}), source=f"defaults for {device_name}")


FITTED = ("gemm_max", "hbm_efficiency", "intra_link_efficiency", "step_overhead_s")


def save_constants(path: Path, constants: Constants, extra: dict) -> None:
    """Write the constants (and what they were fitted from) as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        json.dump({"constants": asdict(constants), **extra}, out, indent=1)
    os.replace(tmp, path)


def load_constants(path: str | None) -> Constants:
    """Constants from a `bench --calibrate` file, or the defaults without one."""
    if not path:
        return Constants()
    try:
        data = json.loads(Path(path).read_text())["constants"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--calibration {path}: not a calibration file written by `bench --calibrate` ({err})")
    known = {f.name for f in fields(Constants)}
    return Constants(**{k: v for k, v in data.items() if k in known})
