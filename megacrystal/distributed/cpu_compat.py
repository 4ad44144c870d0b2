"""Every workaround that lets megatron-core 0.16.x run (and run at speed) on a CPU-only torch build.

megatron-core assumes CUDA throughout. Each patch below names the upstream behaviour it works around and
is kept as narrow as it can be: megatron's own view of `torch` is redirected (not torch itself), and
tensor-method aliases exist only while the named megatron function runs. One lifecycle: `install()` at runtime
start (distributed/runtime.py) applies them all, once per process, and only when CUDA is absent, so GPU runs use
megatron-core and DeepSpeed unmodified; `uninstall()` undoes them (for tests); `installed()` lists them (printed
under --debug). tests/distributed/test_cpu_compat*.py show each patch is still needed (the upstream call fails
without it) and that it works.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable

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


@dataclass(frozen=True)
class Patch:
    """One installed workaround: its name, the upstream behaviour it works around, and how to undo it."""

    name: str
    works_around: str
    undo: Callable[[], None]


_installed: list[Patch] = []


def _restore(owner, name: str, original) -> Callable[[], None]:
    return lambda: setattr(owner, name, original)


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


def _redirect_megatron_torch() -> int:
    """Point the global `torch` of every loaded megatron.core module at the CPU view; return the count."""
    count = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _TORCH_ON_CPU
            count += 1
    return count


def _unredirect_megatron_torch() -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is _TORCH_ON_CPU:
            module.torch = torch


def _megatron_torch_view() -> Callable[[], None]:
    """megatron modules call torch factories with a literal device="cuda" and torch.cuda.current_device(),
    synchronize, empty_cache, get_rng_state, manual_seed, which raise on a CPU-only torch build."""
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    _redirect_megatron_torch()
    return _unredirect_megatron_torch


def _cpu_rng_tracker() -> Callable[[], None]:
    """tensor_parallel.random reads/writes torch.cuda default generators directly; use the CPU one."""
    import megatron.core.tensor_parallel.random as mp_random

    saved = mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def undo():
        mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state = saved

    return undo


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


def _scope_tensor_aliases() -> Callable[[], None]:
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
    undo = []
    for owner, name in targets:
        fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if not getattr(fn, "__megacrystal_cpu_compat__", False):
            setattr(owner, name, _with_cuda_tensor_aliases(fn))
            undo.append(_restore(owner, name, fn))
    return lambda: [restore() for restore in reversed(undo)]


def l2_norm_by_dot_products(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for apex's multi_tensor_l2norm: the l2 norm of every tensor in tensor_lists[0] together."""
    squares = [torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensor_lists[0] if t.numel()]
    total = torch.stack(squares).double().sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)
    return total.float().reshape(1), None


def _grad_norm_by_dot_products() -> Callable[[], None]:
    """Speed: without Apex, megatron's clip_grads falls back to local_multi_tensor_l2_norm, one torch.norm per
    gradient plus a float() each; on CPU a BLAS dot product per gradient reads the same bytes faster, and sums
    in fp64 across tensors (docs/benchmarks/README.md has the measurement)."""
    from megatron.core.optimizer import clip_grads

    saved = clip_grads.l2_norm_impl
    clip_grads.l2_norm_impl = l2_norm_by_dot_products
    return _restore(clip_grads, "l2_norm_impl", saved)


def transformer_config_overrides() -> dict:
    """TransformerConfig fields that must differ on CPU (gloo); empty when CUDA is present.

    batch_p2p_comm: megatron's batched pipeline p2p posts [send_prev, recv_prev, send_next, recv_next]
    together and relies on NCCL's grouped semantics. gloo matches point-to-point messages between two ranks
    by posting order, so with two pipeline ranks and virtual stages (where prev == next) an activation
    and a gradient of the same shape arrive swapped and training silently diverges. The unbatched path
    sends the two directions over different groups.
    """
    return {} if not needed() else {"batch_p2p_comm": False}


def _gloo_config_overrides() -> Callable[[], None]:
    """Every megatron config built in this process gets transformer_config_overrides() before its checks run."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    original = ModelParallelConfig.__post_init__

    @functools.wraps(original)
    def post_init(self):
        for name, value in transformer_config_overrides().items():  # looked up per call: tests replace it
            setattr(self, name, value)
        return original(self)

    ModelParallelConfig.__post_init__ = post_init
    return _restore(ModelParallelConfig, "__post_init__", original)


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


def _patch_reshardable_load() -> Callable[[], None]:
    """DistributedOptimizer._set_main_param_and_optimizer_states raises KeyError('step') on torch AdamW state."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    DistributedOptimizer._set_main_param_and_optimizer_states = _skip_adam_step_on_reshard(original)
    return _restore(DistributedOptimizer, "_set_main_param_and_optimizer_states", original)


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


_optimizer_load_depth = [0]  # ChainedOptimizer calls its members' methods: act around the outermost call only


def _around_outermost(original, before=None, after=None):
    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        outermost = _optimizer_load_depth[0] == 0
        if outermost and before is not None:
            before(self, *args, **kwargs)
        _optimizer_load_depth[0] += 1
        try:
            result = original(self, *args, **kwargs)
        finally:
            _optimizer_load_depth[0] -= 1
        if outermost and after is not None:
            after(self)
        return result

    return wrapped


def _adamw_state_around_optimizer_load() -> Callable[[], None]:
    """before_optimizer_load ahead of megatron's sharded_state_dict(is_loading=True), after_optimizer_load after
    its load_state_dict, for every megatron optimizer class that implements them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer

    def before(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading:
            before_optimizer_load(self)

    undo = []
    for cls in (ChainedOptimizer, DistributedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer):
        for name, hooks in (("sharded_state_dict", {"before": before}),
                            ("load_state_dict", {"after": after_optimizer_load})):
            original = cls.__dict__[name]
            setattr(cls, name, _around_outermost(original, **hooks))
            undo.append(_restore(cls, name, original))
    return lambda: [restore() for restore in reversed(undo)]


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


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `action(module)` right after `name` is first imported, without importing it now (DeepSpeed is slow
    to import and most runs never do)."""

    def __init__(self, name: str, action: Callable[[types.ModuleType], None]):
        self.name, self.action, self._finding = name, action, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, action = spec.loader.exec_module, self.action

        def run(module):
            exec_module(module)
            self.remove()
            action(module)

        spec.loader.exec_module = run
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def _deepspeed_accelerator() -> Callable[[], None]:
    set_here = deepspeed_accelerator_env()
    return (lambda: os.environ.pop(_DEEPSPEED_ACCELERATOR_ENV, None)) if set_here else (lambda: None)


def _deepspeed_shm_comm() -> Callable[[], None]:
    """_disable_deepspeed_shm_comm_build, now if deepspeed is imported, else right after its import."""
    if "deepspeed" in sys.modules:
        _disable_deepspeed_shm_comm_build()
        return lambda: None
    hook = _AfterImport("deepspeed", lambda module: _disable_deepspeed_shm_comm_build())
    sys.meta_path.insert(0, hook)
    return hook.remove


# -- the lifecycle -------------------------------------------------------------------------------------------
# (name, what upstream does that it works around, the function that applies it and returns its undo)
_PATCHES = (
    ("megatron torch view", "literal device=\"cuda\" factories and torch.cuda.* calls in megatron modules",
     _megatron_torch_view),
    ("CPU RNG tracker", "tensor_parallel.random reads and writes the CUDA default generators", _cpu_rng_tracker),
    ("scoped tensor aliases", "megatron optimizers and clip_grads check 'torch.cuda.*Tensor'; ties call .cuda()",
     _scope_tensor_aliases),
    ("unbatched pipeline p2p", "batch_p2p_comm relies on NCCL's grouped sends; gloo swaps same-shape messages",
     _gloo_config_overrides),
    ("AdamW state around optimizer load", "megatron's loaders expect a per-param `step` and restore it per "
     "group only (torch AdamW)", _adamw_state_around_optimizer_load),
    ("reshardable load without step", "fully_reshardable load copies a `step` key torch AdamW keeps per group",
     _patch_reshardable_load),
    ("grad norm by dot products", "speed: megatron's torch l2 norm fallback, one norm and float() per gradient",
     _grad_norm_by_dot_products),
    ("DeepSpeed accelerator cpu", "deepspeed autodetects the accelerator and warns on every rank",
     _deepspeed_accelerator),
    ("DeepSpeed shm op not built", "deepspeed.comm JIT-compiles an inference-only shared-memory op",
     _deepspeed_shm_comm),
)


def install(verbose: bool = False) -> list[Patch]:
    """Apply every CPU workaround once per process when CUDA is absent; return what is installed (nothing with
    CUDA). Idempotent; calling it again after more of megatron-core is imported gives those modules the CPU view
    too. `verbose` prints the list (the CLI's --debug)."""
    if not needed():
        return []
    if not _installed:
        for name, works_around, apply_patch in _PATCHES:
            _installed.append(Patch(name, works_around, apply_patch()))
    else:
        _redirect_megatron_torch()
    if verbose:
        print(describe(), flush=True)
    return list(_installed)


def uninstall() -> None:
    """Undo every installed workaround, newest first (for tests)."""
    while _installed:
        _installed.pop().undo()


def installed() -> list[Patch]:
    """The workarounds installed in this process."""
    return list(_installed)


def describe() -> str:
    """The installed workarounds, one line each, for --debug."""
    lines = [f"cpu_compat: {len(_installed)} CPU workarounds installed"]
    lines += [f"  {p.name}: {p.works_around}" for p in _installed]
    return "\n".join(lines)


def debug_requested() -> bool:
    """Whether the CLI ran with --debug (it sets MEGACRYSTAL_DEBUG for this process and its ranks)."""
    return os.environ.get("MEGACRYSTAL_DEBUG") == "1"
