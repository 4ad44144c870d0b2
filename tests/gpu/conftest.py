"""tests/gpu: checks that need CUDA GPUs (marked `cuda`); they skip on a machine without them, as in CI."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs CUDA GPUs (launch/gpu-check.sh runs these); skipped without")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible to torch (run launch/gpu-check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
