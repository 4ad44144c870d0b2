"""The DeepSpeed JSON config of a run: generated from ours, with the user's deepspeed.config merged over it.

Fields megacrystal derives (batch sizes, clipping, ZeRO stage, precision) have one source of truth, our
config: the user's JSON may repeat them with the same value but not change them. Everything else in the
user's JSON (bucket sizes, overlap_comm, offload, ...) is deep-merged over the generated config.
Every problem is a one-line ConfigError from validate(), which needs only the config and the world size
(no process group, model or DeepSpeed import); the engine runs the same checks before building anything.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from ..config import Config, ConfigError

# Keys megacrystal sets itself and that the user's JSON must not redefine.
_OWNED_ELSEWHERE = {
    "optimizer": "the optimizer is AdamW with Crystal's muP groups, set by optim.*",
    "scheduler": "the learning rate follows optim.* / data.phases",
    "fp16": "fp16 is not supported; use train.precision: bf16",
}


def generated_config(config: Config, dp: int) -> dict:
    """DeepSpeed config for `config` at data-parallel size `dp`, before the user's JSON."""
    t = config.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": config.optim.clip_grad,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # the trainer reports progress itself
        "wall_clock_breakdown": False,
    }


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in: nested dicts merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_user_config(path: str) -> dict:
    """The user's DeepSpeed JSON as a dict."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config: no such file {path}; give the path of a DeepSpeed JSON config")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object of DeepSpeed settings")
    return data


def _derived_fields(config: Config, generated: dict) -> dict[str, tuple[object, str]]:
    """Dotted DeepSpeed field -> (value megacrystal sets, the megacrystal field it comes from)."""
    return {
        "train_batch_size": (generated["train_batch_size"], "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (generated["train_micro_batch_size_per_gpu"], "train.micro_batch_size"),
        "gradient_accumulation_steps": (generated["gradient_accumulation_steps"],
                                        "train.global_batch_size / (train.micro_batch_size x data-parallel size)"),
        "gradient_clipping": (generated["gradient_clipping"], "optim.clip_grad"),
        "zero_optimization.stage": (generated["zero_optimization"]["stage"], "deepspeed.zero_stage"),
        "bf16.enabled": (generated["bf16"]["enabled"], "train.precision"),
    }


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_user_config(config: Config, generated: dict, user: dict) -> None:
    path = config.deepspeed.config
    for key, why in _OWNED_ELSEWHERE.items():
        disabled_fp16 = key == "fp16" and not _lookup(user, "fp16.enabled")
        if key in user and not disabled_fp16:
            raise ConfigError(f"deepspeed.config: remove {key!r} from {path}: {why}")
    for dotted, (ours, source) in _derived_fields(config, generated).items():
        theirs = _lookup(user, dotted)
        if theirs is not None and theirs != ours:
            raise ConfigError(f"deepspeed.config: {dotted} is {theirs!r} in {path} but {source} gives {ours!r}; "
                              f"remove it from the JSON (megacrystal sets it) or make them agree")


def offload_devices(ds_config: dict) -> list[str]:
    """The ZeRO offload sections that move something off the accelerator (e.g. ['offload_optimizer'])."""
    zero = ds_config.get("zero_optimization") or {}
    return [key for key in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(key), dict) and str(zero[key].get("device", "none")).lower() != "none"]


def cxx_compiler() -> str | None:
    """Path of the C++ compiler torch's JIT extension builds would use ($CXX, else c++ or g++), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def check_supported(config: Config) -> None:
    """Megatron-only features that engine: deepspeed does not provide (pp > 1 is refused by the schema)."""
    if config.parallel.sp:
        raise ConfigError("parallel.sp: sequence parallelism is not supported with engine: deepspeed "
                          "(its layer-norm gradients need megatron's tensor-parallel reduction); use engine: megatron")
    if config.parallel.distributed_optimizer:
        raise ConfigError("parallel.distributed_optimizer: megatron's distributed optimizer is not used with "
                          "engine: deepspeed; shard optimizer state with deepspeed.zero_stage (1-3) instead")


def build_deepspeed_config(config: Config, dp: int) -> dict:
    """The complete DeepSpeed config of this run; ConfigError on any conflict (call before any work)."""
    check_supported(config)
    generated = generated_config(config, dp)
    ds_config = generated
    if config.deepspeed.config:
        user = load_user_config(config.deepspeed.config)
        _check_user_config(config, generated, user)
        ds_config = deep_merge(generated, user)
    offload = offload_devices(ds_config)
    if offload and cxx_compiler() is None:
        raise ConfigError(f"deepspeed.config: zero_optimization.{offload[0]} needs DeepSpeed's C++ CPU ops "
                          f"(CPU Adam), compiled at first use, but no C++ compiler was found ($CXX, c++, g++); "
                          f"install g++ or remove the offload section")
    return ds_config


def validate(config: Config, world_size: int) -> dict:
    """All DeepSpeed config errors for a launch of `world_size` processes, before any work starts."""
    return build_deepspeed_config(config, config.data_parallel_size(world_size))
