"""Read a megacrystal checkpoint: resolve it, its run config, and its full fp32 weights under global names.

A megatron-engine checkpoint is loaded through megatron-core's dist_checkpointing into the model built at the
layout asked for (TP=1 x PP=1 for a full state dict): dist_checkpointing reshards from whatever TP/PP/DP layout
saved it. When the run trained in bf16, the fp32 master weights of the optimizer state are read instead of the
bf16 model copy, so an export carries the weights training actually holds. A DeepSpeed checkpoint
(`engine/zero/`) is consolidated with DeepSpeed's own zero_to_fp32 (ZeRO >= 1, tp = 1) or from the module
states (ZeRO-0, or tp > 1: the TP shards are merged here).
"""
from __future__ import annotations

import contextlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..checkpoint import LATEST, CheckpointError, CheckpointStore, verify
from ..checkpoint.manifest import MANIFEST
from ..config import Config, ConfigError, config_from_dict
from ..model.names import global_shape
from . import keys

CONFIG_FILE = "config.yaml"
TRAINER_STATE = "trainer_state.json"
ENGINE_DIR = "engine"
# Where megatron's optimizer state keeps fp32 master weights: non-distributed mixed precision, distributed.
MASTER_PREFIXES = ("optimizer.state.fp32_param", "optimizer.state.param")


@dataclass
class Gathered:
    """A checkpoint's run config, trainer state (step, phase) and full fp32 weights under global names."""

    path: Path
    config: Config
    state: dict
    weights: dict[str, torch.Tensor]
    source: str  # how the weights were read, for messages


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names (a checkpoint, or a checkpoint root with `latest`), size-checked."""
    p = Path(path).expanduser().absolute()
    if p.is_dir() and not (p / MANIFEST).exists() and (p / LATEST).is_file():
        p = CheckpointStore(p, recover=False).latest() or p
    verify(p, deep=False)  # NotACheckpoint / CheckpointDamaged: one-line CheckpointErrors
    return p


def checkpoint_config(ckpt: Path) -> Config:
    """The resolved run config a checkpoint was saved with."""
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {CONFIG_FILE}; pass a checkpoint written by "
                              f"`megacrystal train` or `megacrystal import`")
    try:
        raw = yaml.safe_load(path.read_text())
        return config_from_dict(raw if isinstance(raw, dict) else {})
    except (yaml.YAMLError, ConfigError) as err:
        raise CheckpointError(f"checkpoint {ckpt}: {CONFIG_FILE} is not a valid run config ({err})") from None


def trainer_state(ckpt: Path) -> dict:
    """The trainer state of a checkpoint (step, phase, ...); {} when it has none."""
    path = ckpt / TRAINER_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def engine_kind(ckpt: Path) -> str:
    """'megatron' (dist_checkpointing files) or 'deepspeed' (engine/zero/)."""
    engine = ckpt / ENGINE_DIR
    if (engine / "zero").is_dir():
        return "deepspeed"
    if (engine / "metadata.json").is_file():
        return "megatron"
    raise CheckpointError(f"checkpoint {ckpt} has no model state in {engine} (neither dist_checkpointing "
                          f"metadata.json nor a DeepSpeed zero/ directory)")


def layout_config(config: Config, tp: int = 1, pp: int = 1, world: int = 1, precision: str = "fp32") -> Config:
    """`config` re-laid out for reading or writing weights: megatron engine, tp x pp, no SP/VPP/distributed
    optimizer, one sequence per micro-batch and a global batch that any data-parallel size divides."""
    raw = config.model_dump(mode="json")
    raw["engine"] = "megatron"
    raw["parallel"] = {"tp": tp, "pp": pp}
    dp = max(1, world // (tp * pp))
    raw["train"].update(micro_batch_size=1, global_batch_size=dp, precision=precision)
    return config_from_dict(raw)


def master_prefix(engine_dir: Path) -> str | None:
    """The optimizer-state prefix holding fp32 master weights in a dist checkpoint, if it has one."""
    from megatron.core import dist_checkpointing

    names = dist_checkpointing.load_tensors_metadata(str(engine_dir)).keys()
    for prefix in MASTER_PREFIXES:
        if any(name.startswith(prefix + ".") for name in names):
            return prefix
    return None


def load_weights(chunks: list, engine_dir: Path) -> str:
    """Load a dist checkpoint's weights into this rank's model chunks at their layout (collective).

    Reads the fp32 master weights when the checkpoint has them. Returns which weights were read.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    prefix = master_prefix(engine_dir)
    request = {}
    for i, chunk in enumerate(chunks):
        wanted = {}
        for name, item in chunk.sharded_state_dict().items():
            if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                continue  # _extra_state objects: nothing of Crystal's weights
            wanted[name] = make_sharded_optimizer_tensor(item, item.data, prefix) if prefix else item
        request[f"model{i}"] = wanted
    with warnings.catch_warnings():  # torch's DCP deprecation notices, raised inside megatron's loader
        warnings.simplefilter("ignore", FutureWarning)
        loaded = dist_checkpointing.load(request, str(engine_dir))
    for i, chunk in enumerate(chunks):
        result = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"checkpoint {engine_dir.parent} lacks {len(missing)} weights of this model "
                                  f"(first: {missing[0]}); it belongs to another model")
    return f"fp32 master weights ({prefix})" if prefix else "model weights"


def gather(path: str | Path) -> Gathered:
    """Full fp32 weights of a checkpoint under global names (collective over the launched world)."""
    ckpt = resolve_checkpoint(path)
    config = checkpoint_config(ckpt)
    state = trainer_state(ckpt)
    if engine_kind(ckpt) == "deepspeed":
        weights, source = gather_deepspeed(ckpt, config)
        return Gathered(ckpt, config, state, weights, source)
    from ..distributed.runtime import setup_parallel, teardown_parallel, world_size_from_env
    from ..model.crystal import build_model_chunks
    from ..model.names import global_named_parameters

    single = layout_config(config, world=world_size_from_env())
    layout = setup_parallel(single)
    try:
        (chunk,) = build_model_chunks(single.model, single.parallel, "fp32")
        chunk = chunk.to(layout.device)
        source = load_weights([chunk], ckpt / ENGINE_DIR)
        weights = {name: param.detach().cpu() for name, param in global_named_parameters(chunk)}
    finally:
        teardown_parallel()
    check_weights(weights, config.model, str(ckpt))
    return Gathered(ckpt, config, state, weights, source)


def check_weights(weights: dict[str, torch.Tensor], m, where: str) -> None:
    """Every global weight of model `m` is present with its unsplit shape."""
    expected = keys.global_shapes(m)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} weights are missing (first: {missing[0]})")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(weights[name].shape)}, {shape} expected")


# -- DeepSpeed -----------------------------------------------------------------------------------------------
def merge_tp_shards(name: str, shards: list[torch.Tensor], full_shape: tuple[int, ...]) -> torch.Tensor:
    """Merge the TP shards of one parameter (rank order) into the unsplit tensor."""
    if len(shards) == 1 or tuple(shards[0].shape) == full_shape:
        return shards[0]
    dims = [d for d, (g, l) in enumerate(zip(full_shape, shards[0].shape)) if g != l]
    if len(dims) != 1:
        raise CheckpointError(f"{name}: TP shard shape {tuple(shards[0].shape)} does not divide {full_shape}")
    dim = dims[0]
    if "linear_fc1" in name:  # each rank holds [gate_r; up_r]
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(shards, dim=dim)


def gather_deepspeed(ckpt: Path, config: Config) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 weights of a DeepSpeed checkpoint (names are megatron's, pp = 1, so already global)."""
    engine = ckpt / ENGINE_DIR
    zero = engine / "zero"
    m, tp = config.model, config.parallel.tp
    expected = keys.global_shapes(m)
    if config.deepspeed.zero_stage >= 1 and tp == 1:
        from ..distributed import cpu_compat

        cpu_compat.install()  # no runtime here (no process group): DeepSpeed's CPU workarounds before its import
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints a summary; stdout is for results (score's JSON)
            state = get_fp32_state_dict_from_zero_checkpoint(str(engine), tag="zero")
        weights = {name: state[name].float() for name in expected if name in state}
        source = f"fp32 weights of ZeRO-{config.deepspeed.zero_stage} (zero_to_fp32)"
    else:
        shards = []
        for rank in range(tp):
            path = zero / f"mp_rank_{rank:02d}_model_states.pt"
            if not path.is_file():
                raise CheckpointError(f"checkpoint {ckpt}: {path.name} is missing from {zero}")
            shards.append(torch.load(path, map_location="cpu", weights_only=False)["module"])
        weights = {name: merge_tp_shards(name, [s[name] for s in shards], shape).float()
                   for name, shape in expected.items() if all(name in s for s in shards)}
        source = "DeepSpeed module weights" + (f" merged from {tp} TP shards" if tp > 1 else "")
    check_weights(weights, m, str(ckpt))
    return weights, source


def shard_for_rank(name: str, full: torch.Tensor, local_shape, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's piece of the unsplit tensor `full` for a parameter of shape `local_shape`."""
    dims = [d for d, (g, l) in enumerate(zip(full.shape, local_shape)) if g != l]
    if not dims:
        return full
    dim = dims[0]
    if "linear_fc1" in name:  # megatron's SwiGLU chunks the local output: rank r holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


@torch.no_grad()
def load_global_into(chunks: list, get: keys.Getter, m) -> None:
    """Fill this rank's model chunks from global tensors (`get(global_name)`), at any TP/PP layout."""
    from megatron.core import parallel_state as ps

    from ..model.names import global_named_parameters

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for name, param in global_named_parameters(chunk):
            full = get(name)
            if tuple(full.shape) != global_shape(name, m):
                raise CheckpointError(f"{name} has shape {tuple(full.shape)}, {global_shape(name, m)} expected")
            param.copy_(shard_for_rank(name, full, param.shape, tp, tp_rank).to(param.device))
