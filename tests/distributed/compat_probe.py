"""Runs in a fresh spawned process: each upstream call before and after megacrystal's CPU patches."""
from __future__ import annotations

import contextlib
import io
import tempfile

import torch


def _attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as err:  # noqa: BLE001 - the failure itself is what is recorded
        return f"{type(err).__name__}: {err}"


def _calls() -> dict:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    def clip():
        param = torch.nn.Parameter(torch.ones(4))
        param.grad = torch.full((4,), 2.0)
        clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
        assert torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-5), param.grad

    return {
        "causal_mask": lambda: transformer_utils.get_default_causal_mask(4),  # literal device="cuda"
        "rotary": lambda: RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(4),  # torch.cuda.current_device()
        "rng_state": lambda: mp_random._get_cuda_rng_state(),  # CUDA default generators
        "clip_grads": clip,  # asserts grad.type() == 'torch.cuda.FloatTensor'
    }


def probe() -> dict:
    from megacrystal.distributed import cpu_compat

    before = {name: _attempt(call) for name, call in _calls().items()}
    originals = _upstream_ids()
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        installed = cpu_compat.install(verbose=True)  # what --debug prints
    again = cpu_compat.install()
    after = {name: _attempt(call) for name, call in _calls().items()}
    # The patches are narrow: torch itself is untouched outside the scoped megatron functions.
    outside = {
        "type": torch.ones(2).type(),
        "cuda_factory": _attempt(lambda: torch.zeros(1, device="cuda")),
        "cuda_current_device": _attempt(torch.cuda.current_device),
    }
    result = {"before": before, "after": after, "active": bool(installed), "outside": outside,
              "bf16": _bf16_steps(), "grad_norm": _grad_norm()}
    lifecycle = {"names": [p.name for p in installed], "listing": listing.getvalue(),
                 "again_same": len(again) == len(installed) and all(a is b for a, b in zip(again, installed)),
                 "original_ids": originals, "installed_ids": _upstream_ids()}
    cpu_compat.uninstall()
    lifecycle["after_uninstall"] = {name: _attempt(call) for name, call in _calls().items()}
    lifecycle["uninstalled_ids"] = _upstream_ids()
    lifecycle["installed_after_uninstall"] = len(cpu_compat.installed())
    cpu_compat.install()
    lifecycle["after_reinstall"] = {name: _attempt(call) for name, call in _calls().items()}
    cpu_compat.uninstall()
    result["lifecycle"] = lifecycle
    return result


def _upstream_ids() -> dict:
    """Identity of every upstream attribute a patch replaces (equal before install and after uninstall)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    return {"torch": id(transformer_utils.torch), "rng": id(mp_random._get_cuda_rng_state),
            "l2": id(clip_grads.l2_norm_impl), "clip": id(clip_grads.clip_grad_by_total_norm_fp32),
            "post_init": id(ModelParallelConfig.__dict__["__post_init__"]),
            "load": id(DistributedOptimizer.__dict__["load_state_dict"]),
            "reshard": id(DistributedOptimizer.__dict__["_set_main_param_and_optimizer_states"]),
            "f16_init": id(optimizer.Float16OptimizerWithFloat16Params.__dict__["__init__"])}


def _grad_norm() -> dict:
    """megatron's gradient norm (through the patched l2 norm) against the float64 norm of all gradients."""
    from megatron.core.optimizer import clip_grads

    from megacrystal.distributed import cpu_compat

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) * scale for n, scale in ((1000, 1.0), (37, 10.0), (4096, 0.01))]
    exact = torch.cat([g.double() for g in grads]).norm().item()
    return {"patched": clip_grads.l2_norm_impl is cpu_compat.l2_norm_by_dot_products,
            "megatron": clip_grads.get_grad_norm_fp32(grads), "exact": exact}


def _bf16_steps() -> list[float]:
    """Two bf16 steps through megatron's Float16 optimizer (its `param.type()` checks need the aliases)."""
    from megacrystal.config import config_from_dict
    from megacrystal.train.loop import train

    with tempfile.TemporaryDirectory() as run_dir:
        config = config_from_dict({
            "run": {"dir": run_dir},
            "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96,
                      "vocab_size": 128, "seq_length": 16},
            "optim": {"lr": 0.01},
            "train": {"steps": 2, "global_batch_size": 2, "precision": "bf16", "threads": 1},
        })
        return [r.loss for r in train(config)]
