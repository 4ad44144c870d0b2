"""Throughput benchmarking: sweeps of parallel layouts, device peaks, MFU, scaling efficiency, reports."""
