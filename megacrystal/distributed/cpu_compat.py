"""Every workaround that lets megatron-core 0.16.x run (and run at speed) on a CPU-only torch build.

megatron-core assumes CUDA throughout. Each patch below names the upstream behaviour it works around and
is kept as narrow as it can be: megatron's own view of `torch` is redirected (not torch itself), and
tensor-method aliases exist only while the named megatron function runs. `apply()` is a no-op when CUDA
is available, so GPU runs use megatron-core unmodified. tests/distributed/test_cpu_compat.py shows each
patch is still needed (the upstream call fails without it) and that it works.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import types

import torch

_CPU = torch.device("cpu")
# torch factories that megatron calls with a literal device="cuda" (schedules.py total_num_tokens,
# transformer/utils.py causal masks, optimizer.py/clip_grads.py scalars, param_and_grad_buffer.py).
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand", "randn", "randint")
# megatron subpackages whose modules get the CPU view of torch; imported up front so they exist.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    # imported lazily by dist_checkpointing.save/load, so loaded here to get the CPU view in time
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def needed() -> bool:
    """True when the patches apply: no usable CUDA device."""
    return not torch.cuda.is_available()


def _on_cpu(device) -> bool:
    return device is not None and str(device).startswith("cuda")


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _on_cpu(kwargs.get("device")):
            kwargs["device"] = _CPU
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


class _CudaOnCpu(types.ModuleType):
    """megatron's `torch.cuda`: current_device() is the CPU, syncs are no-ops, RNG is the CPU generator.

    Works around ~100 `device=torch.cuda.current_device()` sites (layers, rotary embedding, buffers)
    and `torch.cuda.synchronize/empty_cache/get_rng_state/manual_seed` calls that raise on CPU builds.
    """

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: _CPU
        self.synchronize = lambda *a, **k: None
        self.empty_cache = lambda: None
        self.get_rng_state = lambda device="cuda": torch.get_rng_state()
        # Not torch.manual_seed: that reseeds every device and would recurse through torch.cuda.
        self.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """The `torch` that megatron modules see: real torch, but device="cuda" factories build on CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)


_TORCH_ON_CPU = _TorchOnCpu()
_applied = False


def _redirect_megatron_torch() -> int:
    """Point the global `torch` of every loaded megatron.core module at the CPU view; return the count."""
    count = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _TORCH_ON_CPU
            count += 1
    return count


def _cpu_rng_tracker() -> None:
    """tensor_parallel.random reads/writes torch.cuda default generators directly; use the CPU one."""
    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


_orig_tensor_type = torch.Tensor.type
_CUDA_TYPE_NAMES = {"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor"}


def _type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    name = _orig_tensor_type(self, dtype, non_blocking, **kwargs) if (dtype or kwargs) else _orig_tensor_type(self)
    if dtype is None and not kwargs and name in _CUDA_TYPE_NAMES:
        return "torch.cuda." + name[len("torch."):]
    return name


@contextlib.contextmanager
def _cuda_tensor_aliases():
    """While active: Tensor.type() names CPU float tensors 'torch.cuda.*' and Tensor.cuda() is a no-op."""
    saved_type, saved_cuda = torch.Tensor.type, torch.Tensor.cuda
    torch.Tensor.type = _type_as_cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = saved_type, saved_cuda


def _with_cuda_tensor_aliases(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_tensor_aliases():
            return fn(*args, **kwargs)

    wrapped.__megacrystal_cpu_compat__ = True
    return wrapped


def _scope_tensor_aliases() -> None:
    """Give the megatron functions that string-match 'torch.cuda.*Tensor' or call .cuda() the aliases.

    - optimizer.Float16OptimizerWithFloat16Params.__init__ and distrib_optimizer.DistributedOptimizer
      (__init__, _build_model_and_main_param_groups) classify params by `param.type()` and raise
      "Wrapped parameters must be one of torch.cuda.FloatTensor..." for CPU tensors.
    - clip_grads.clip_grad_by_total_norm_fp32 asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.
    - LanguageModule.setup_embeddings_and_output_layer does `weight.data.cuda()` before the all-reduce
      that ties the last pipeline stage's output weight to the embedding.
    - DistributedOptimizer.get_parameter_state_dp_zero (the "fully_reshardable" checkpoint format) moves
      each optimizer-state shard with `.cuda()` before gathering it on data-parallel rank 0.
    """
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    targets = [
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero"),
        (language_module.LanguageModule, "setup_embeddings_and_output_layer"),
        (clip_grads, "clip_grad_by_total_norm_fp32"),
        (optimizer, "clip_grad_by_total_norm_fp32"),  # imported by name into optimizer.py
    ]
    for owner, name in targets:
        fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if not getattr(fn, "__megacrystal_cpu_compat__", False):
            setattr(owner, name, _with_cuda_tensor_aliases(fn))


def l2_norm_by_dot_products(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for apex's multi_tensor_l2norm: the l2 norm of every tensor in tensor_lists[0] together."""
    squares = [torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensor_lists[0] if t.numel()]
    total = torch.stack(squares).double().sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)
    return total.float().reshape(1), None


def _grad_norm_by_dot_products() -> None:
    """Speed: without Apex, megatron's clip_grads falls back to local_multi_tensor_l2_norm, one torch.norm per
    gradient plus a float() each; on CPU a BLAS dot product per gradient reads the same bytes at twice the
    speed (measured 7.5 against 17.6 ms per step for the 42M-parameter small model), fp64 across tensors."""
    from megatron.core.optimizer import clip_grads

    clip_grads.l2_norm_impl = l2_norm_by_dot_products


def apply() -> bool:
    """Apply every CPU workaround once per process if CUDA is absent; return whether they are active.

    Safe to call again after importing more of megatron-core: newly loaded modules get the CPU view too.
    """
    global _applied
    if not needed():
        return False
    import importlib

    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    _redirect_megatron_torch()
    if not _applied:
        _cpu_rng_tracker()
        _scope_tensor_aliases()
        _patch_reshardable_load()
        _grad_norm_by_dot_products()
        _applied = True
    return True


def transformer_config_overrides() -> dict:
    """TransformerConfig fields that must differ on CPU (gloo); empty when CUDA is present.

    batch_p2p_comm: megatron's batched pipeline p2p posts [send_prev, recv_prev, send_next, recv_next]
    together and relies on NCCL's grouped semantics. gloo matches point-to-point messages between two ranks
    by posting order, so with two pipeline ranks and virtual stages (where prev == next) an activation
    and a gradient of the same shape arrive swapped and training silently diverges. The unbatched path
    sends the two directions over different groups.
    """
    return {} if not needed() else {"batch_p2p_comm": False}


# -- optimizer checkpoint loading with torch's AdamW ----------------------------------------------------
# Without Apex/Transformer Engine (always the case on CPU) megatron falls back to torch.optim.AdamW, whose
# per-parameter state megatron's loaders do not fully expect.

def _adamw_groups(optimizer):
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt.optimizer for opt in inner if getattr(opt, "optimizer", None) is not None]


def before_optimizer_load(optimizer) -> None:
    """DistributedOptimizer.sharded_state_dict(is_loading=True) asserts one `step` across the state of all
    params (`assert len(steps) == 1`), but megatron's init_state_fn creates only exp_avg/exp_avg_sq for torch
    AdamW. Give every param the state torch would, with step 0, before the loader inspects it."""
    if not needed():
        return
    for adamw in _adamw_groups(optimizer):
        for group in adamw.param_groups:
            for param in group["params"]:
                state = adamw.state[param]
                if "step" not in state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                    state["step"] = torch.zeros((), dtype=torch.float32)


def _skip_adam_step_on_reshard(original):
    """DistributedOptimizer._set_main_param_and_optimizer_states copies every key of a param's optimizer state
    from the checkpoint, but the "fully_reshardable" format carries torch Adam's `step` per group, not per param
    (its loader skips it on purpose), so the copy raises KeyError('step'). Leave `step` to the group restore."""

    @functools.wraps(original)
    def wrapped(self, model_param, tensors):
        if "step" in tensors:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    wrapped.__megacrystal_cpu_compat__ = True
    return wrapped


def _patch_reshardable_load() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if not getattr(original, "__megacrystal_cpu_compat__", False):
        DistributedOptimizer._set_main_param_and_optimizer_states = _skip_adam_step_on_reshard(original)


def after_optimizer_load(optimizer) -> None:
    """The distributed optimizer restores Adam's step count into param_groups['step'] only; torch AdamW reads
    state[p]['step'], so without this the bias correction silently restarts at step 0 after a resume."""
    if not needed():
        return
    for adamw in _adamw_groups(optimizer):
        for group in adamw.param_groups:
            if "step" in group:
                for param in group["params"]:
                    adamw.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


# =====================================================================================================
# DeepSpeed (engine: deepspeed), DeepSpeed 0.19.x on the CPU accelerator over gloo.
# Same rules as above: nothing happens when CUDA is available, each workaround names the upstream
# behaviour it avoids, and tests/distributed/test_cpu_compat_deepspeed.py shows each is still needed.
# =====================================================================================================
_DEEPSPEED_ACCELERATOR_ENV = "DS_ACCELERATOR"
_DEEPSPEED_SHM_OP = "deepspeed_shm_comm"


def deepspeed_accelerator_env() -> bool:
    """Name DeepSpeed's accelerator (cpu) unless the user did; return whether it was set here.

    deepspeed.accelerator.real_accelerator.get_accelerator() autodetects the accelerator on first use
    (when deepspeed is imported) and, finding no GPU, logs a WARNING on every rank: "Setting accelerator to
    CPU. If you have GPU or other accelerator, we were unable to detect it." With DS_ACCELERATOR=cpu it
    picks the same CPU_Accelerator silently. Must run before deepspeed is first imported.
    """
    import os

    if not needed() or _DEEPSPEED_ACCELERATOR_ENV in os.environ:
        return False
    os.environ[_DEEPSPEED_ACCELERATOR_ENV] = "cpu"
    return True


def _disable_deepspeed_shm_comm_build() -> None:
    """Keep deepspeed.comm from JIT-compiling its shared-memory all-reduce op.

    deepspeed.comm.torch.TorchBackend.__init__ (run by deepspeed.initialize / init_distributed) always
    calls build_shm_op(), which on the CPU accelerator compiles `deepspeed_shm_comm` with g++ and ninja
    (about a minute on first use, cached under ~/.cache/torch_extensions), prints "DeepSpeed ... built
    successfully" on every rank, and crashes without a C++ compiler. The op only serves inference's
    inference_all_reduce; training never calls it. build_shm_op() skips the build when the op is marked
    incompatible in deepspeed.ops.__compatible_ops__ (its only reader), so it is marked so.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[_DEEPSPEED_SHM_OP] = False


def import_deepspeed():
    """Import and return `deepspeed` with the CPU workarounds applied (none when CUDA is available)."""
    deepspeed_accelerator_env()
    import deepspeed

    if needed():
        _disable_deepspeed_shm_comm_build()
    return deepspeed
