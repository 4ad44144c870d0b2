"""On CUDA: the GPU path reproduces the numbers the CPU tests pin down. Every parallel layout that fits the visible
GPUs gives the single-GPU losses; fused kernels give the unfused (torch) path's losses; bf16 tracks fp32 within the
CPU tests' bf16 tolerance. Run by launch/gpu-check.sh; skipped without CUDA."""
import pytest
import torch

from megacrystal.config.schema import Config
from tests.helpers import run_on_ranks

from .cuda_runs import losses_on_cuda

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# Layouts by the GPUs they need (as tests/engines/test_parallel_losses.py runs them on CPU ranks).
LAYOUTS = {
    2: {"tp2": {"parallel.tp": 2}, "pp2": {"parallel.pp": 2}, "tp2_sp": {"parallel.tp": 2, "parallel.sp": True},
        "dp2": {}, "dp2_distopt_overlap": {"parallel.distributed_optimizer": True, "parallel.overlap_grad_reduce": True,
                                           "parallel.grad_bucket_size": 4000},
        "pp2_vpp2": {"parallel.pp": 2, "parallel.vpp": 2}},
    4: {"tp2_pp2": {"parallel.tp": 2, "parallel.pp": 2}, "tp2_sp_dp2_distopt": {
        "parallel.tp": 2, "parallel.sp": True, "parallel.distributed_optimizer": True}},
}
# Every kernel switch off: the torch path (megacrystal/kernels/select.py), where the config has the switches.
_KERNELS = Config.model_fields.get("kernels")
UNFUSED = {f"kernels.{name}": "off" for name in _KERNELS.annotation.model_fields} if _KERNELS else {}
# GPU reductions (split-K GEMMs, NCCL's ring order) differ between layouts more than the CPU's do.
LAYOUT_REL = 1e-4
BF16_REL = 3e-2  # tests/model/test_crystal.py's bf16 gradient tolerance
FUSED_REL = 1e-3  # fp32: fused kernels reorder sums (LayerNorm statistics, softmax) but keep fp32


@pytest.fixture(scope="module")
def runs():
    single = {"fp32": {}, "bf16": {"train.precision": "bf16"}}
    if UNFUSED:
        single.update(fp32_unfused=UNFUSED, bf16_unfused={**UNFUSED, "train.precision": "bf16"})
    results = run_on_ranks(losses_on_cuda, 1, single)[0]
    for size, layouts in LAYOUTS.items():
        if GPUS >= size:
            results.update(run_on_ranks(losses_on_cuda, size, layouts)[0])
    return results


def test_the_runs_were_on_the_gpu_over_nccl(runs):
    for name, run in runs.items():
        assert run["backend"] == "nccl" and run["peak_memory_mb"] > 0, name
    losses = runs["fp32"]["loss"]
    assert len(losses) == 5 and losses[-1] < losses[0]


@pytest.mark.parametrize("layout", [name for size, layouts in LAYOUTS.items() for name in layouts])
def test_layout_matches_the_single_gpu(runs, layout):
    if layout not in runs:
        pytest.skip(f"needs more than the {GPUS} visible GPU(s)")
    expected, got = runs["fp32"], runs[layout]
    assert got["loss"] == pytest.approx(expected["loss"], rel=LAYOUT_REL, abs=0)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=10 * LAYOUT_REL, abs=0)


def test_bf16_tracks_fp32(runs):
    assert runs["bf16"]["loss"] == pytest.approx(runs["fp32"]["loss"], rel=BF16_REL)


@pytest.mark.parametrize("precision, rel", [("fp32", FUSED_REL), ("bf16", BF16_REL)])
def test_fused_kernels_match_the_torch_path(runs, precision, rel):
    if not UNFUSED:
        pytest.skip("this config schema has no kernels.* switches")
    assert runs[precision]["loss"] == pytest.approx(runs[f"{precision}_unfused"]["loss"], rel=rel, abs=0)
