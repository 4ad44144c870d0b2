"""Dense (not sparse) peak FLOP/s per device, for honest MFU; on a CPU the bench measures its own peak."""
from __future__ import annotations

import statistics
import time

# TFLOP/s, dense, from the vendors' data sheets (the "with sparsity" figures are twice these and not used).
DEVICE_PEAKS_TFLOPS = {
    "H100 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
    "V100": {"bf16": 0.0, "fp32": 15.7},  # no bf16 tensor cores
    "MI300X": {"bf16": 1307.0, "fp32": 163.4},
}

# What torch.cuda.get_device_name() reports for boards whose name lacks the table's words: the SXM H100
# calls itself "H100 80GB HBM3" (the PCIe card says "PCIe").
DEVICE_NAME_ALIASES = {"H100 80GB HBM3": "H100 SXM"}


def device_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's peak for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or None when unknown."""
    name = device_name.upper()
    for alias, key in DEVICE_NAME_ALIASES.items():
        if all(w in name for w in alias.upper().split()) and "PCIE" not in name:
            return DEVICE_PEAKS_TFLOPS[key][precision] or None
    for key in sorted(DEVICE_PEAKS_TFLOPS, key=len, reverse=True):
        words = key.upper().split()
        if all(w in name for w in words):
            return DEVICE_PEAKS_TFLOPS[key][precision] or None
    return None


def measure_cpu_peak_tflops(precision: str = "fp32", threads: int | None = None, size: int = 2048,
                            repeats: int = 7) -> float:
    """Median TFLOP/s of a size x size matmul on this CPU with `threads` threads (2 n^3 FLOPs per product)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up: thread pool and kernel selection
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * size ** 3 / (time.perf_counter() - start) / 1e12)
        return statistics.median(rates)
    finally:
        torch.set_num_threads(previous)
