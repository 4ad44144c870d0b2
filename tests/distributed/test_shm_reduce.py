"""The shared-memory gradient all-reduce against the sum of every rank's inputs (the engine's use of it is checked
against the single-process losses in tests/engines/test_parallel_losses.py)."""
import pytest
import torch

from tests.helpers import run_on_ranks

from .shm_reduce_runs import reduce_twice


@pytest.mark.parametrize("ranks, numel", [(2, 4096), (3, 1000 + 7)])  # three uneven slices, one short
def test_every_rank_gets_the_sum_of_all_ranks(ranks, numel):
    results = run_on_ranks(reduce_twice, ranks, numel)
    for step in range(2):
        expected = sum(torch.tensor(r["inputs"][step], dtype=torch.float64) for r in results)
        for r in results:
            got = torch.tensor(r["results"][step], dtype=torch.float64)
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
            assert r["results"][step] == results[0]["results"][step]  # the same bits on every rank
    assert all(r["usable"] for r in results)  # one host, /dev/shm with room
    assert results[0]["files_left"] == []  # the shared file was unlinked once mapped
