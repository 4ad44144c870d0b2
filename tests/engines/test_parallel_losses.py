"""TP, PP (1F1B and interleaved), SP and DP (gradients summed in shared memory; by gloo, overlapping backward or
not; reduce-scattered for the distributed optimizer) reproduce the 1-process losses."""
import pytest
import torch

from tests.helpers import run_on_ranks

from .parallel_runs import losses_per_layout

pytestmark = pytest.mark.slow

ON_2_RANKS = {
    "tp2": {"parallel.tp": 2},
    "pp2": {"parallel.pp": 2},
    "tp2_sp": {"parallel.tp": 2, "parallel.sp": True},
    "dp2_distopt": {"parallel.distributed_optimizer": True},
    "pp2_vpp2": {"parallel.pp": 2, "parallel.vpp": 2},
    # gradients summed in shared memory after backward (the overlap asked for has nothing left to overlap)
    "dp2": {"parallel.overlap_grad_reduce": True, "parallel.grad_bucket_size": 4000},
    "dp2_gloo": {"parallel.shared_memory_grad_reduce": False},
    # small buckets, so several gloo all-reduces start during backward
    "dp2_overlap_gloo": {"parallel.overlap_grad_reduce": True, "parallel.grad_bucket_size": 4000,
                         "parallel.shared_memory_grad_reduce": False},
}
ON_4_RANKS = {
    "tp2_pp2": {"parallel.tp": 2, "parallel.pp": 2},
    "tp2_dp2": {"parallel.tp": 2},  # data-parallel groups of ranks {0, 2} and {1, 3}: two shared-memory files
    "tp2_sp_dp2_distopt": {"parallel.tp": 2, "parallel.sp": True, "parallel.distributed_optimizer": True},
    "pp2_dp2_overlap_distopt": {"parallel.pp": 2, "parallel.overlap_grad_reduce": True,
                                "parallel.grad_bucket_size": 4000, "parallel.distributed_optimizer": True},
}


@pytest.fixture(scope="module")
def runs():
    results = run_on_ranks(losses_per_layout, 1, {"single": {}})[0]
    unbatched = {"pp2_vpp2_batched_p2p": ON_2_RANKS["pp2_vpp2"]}
    results.update(run_on_ranks(losses_per_layout, 2, {**ON_2_RANKS, **unbatched}, tuple(unbatched))[0])
    results.update(run_on_ranks(losses_per_layout, 4, ON_4_RANKS)[0])
    return results


def test_single_process_loss_falls(runs):
    losses = runs["single"]["loss"]
    assert len(losses) == 5 and losses[-1] < losses[0]


@pytest.mark.parametrize("layout", list(ON_2_RANKS) + list(ON_4_RANKS))
def test_layout_matches_single_process(runs, layout):
    expected, got = runs["single"], runs[layout]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=0)
    # Clipping is active at every step, so equal losses after step 1 also mean equal global grad norms.
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4, abs=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's reduce")
def test_data_parallel_gradients_are_summed_in_shared_memory_unless_switched_off(runs):
    used = {name for name, run in runs.items() if run.get("shared_memory_grad_reduce")}
    # on: DP > 1 without the distributed optimizer (which reduce-scatters through gloo)
    assert used == {"dp2", "tp2_dp2"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo-only workaround")
def test_batched_p2p_is_still_wrong_on_gloo(runs):
    # Without cpu_compat's batch_p2p_comm=False, interleaved PP on two gloo ranks swaps activations and
    # gradients: the losses leave the single-process curve. If this starts passing, drop the override.
    assert runs["pp2_vpp2_batched_p2p"]["loss"] != pytest.approx(runs["single"]["loss"], rel=1e-5, abs=0)
