"""Each CPU workaround is still needed (the upstream call fails without it), works, and stays narrow."""
import math
import sys

import pytest
import torch

from tests.helpers import run_on_ranks

from .compat_probe import probe

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")]


@pytest.fixture(scope="module")
def result():
    return run_on_ranks(probe, 1)[0]


@pytest.mark.parametrize("call", ["causal_mask", "rotary", "rng_state", "clip_grads"])
def test_upstream_call_fails_without_patch_and_works_with_it(result, call):
    assert result["before"][call] != "ok", f"{call} now works on CPU unpatched: drop its patch"
    assert result["after"][call] == "ok", result["after"][call]


def test_patches_leave_torch_itself_alone(result):
    assert result["active"] is True
    assert result["outside"]["type"] == "torch.FloatTensor"
    assert result["outside"]["cuda_factory"] != "ok"
    assert result["outside"]["cuda_current_device"] != "ok"


def test_bf16_training_runs_on_cpu(result):
    losses = result["bf16"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(128), rel=0.05)  # near-uniform logits at init


def test_grad_norm_by_dot_products_is_megatrons_and_exact(result):
    norm = result["grad_norm"]
    assert norm["patched"]
    assert norm["megatron"] == pytest.approx(norm["exact"], rel=1e-6)


def test_install_is_idempotent_and_lists_every_patch_under_debug(result):
    life = result["lifecycle"]
    assert life["again_same"]  # a second install() patches nothing twice
    assert len(life["names"]) == len(set(life["names"])) >= 9
    for name in life["names"]:
        assert name in life["listing"]
    assert life["listing"].startswith(f"cpu_compat: {len(life['names'])} CPU workarounds installed")


def test_uninstall_restores_upstream(result):
    life = result["lifecycle"]
    changed = {key for key in life["original_ids"] if life["installed_ids"][key] != life["original_ids"][key]}
    assert changed == set(life["original_ids"])  # every probed attribute was replaced while installed
    assert life["uninstalled_ids"] == life["original_ids"]
    assert life["installed_after_uninstall"] == 0
    for call in ("causal_mask", "rotary", "rng_state", "clip_grads"):
        assert life["after_uninstall"][call] != "ok", call  # upstream fails again
        assert life["after_reinstall"][call] == "ok", life["after_reinstall"][call]


def test_after_import_hook_runs_once_on_first_import(tmp_path, monkeypatch):
    # How the DeepSpeed workarounds wait for deepspeed without importing it: a module made here stands in.
    from megacrystal.distributed import cpu_compat

    (tmp_path / "mc_after_import_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = cpu_compat._AfterImport("mc_after_import_probe", lambda module: seen.append(module.VALUE))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    import mc_after_import_probe  # noqa: F401

    assert seen == [1] and hook not in sys.meta_path
    monkeypatch.delitem(sys.modules, "mc_after_import_probe")
