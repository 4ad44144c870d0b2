"""Model and optimizer state of the megatron engine through megatron-core's dist_checkpointing.

Tensors are stored under layout-independent keys (global layer numbers, unsplit shapes), so a checkpoint
saved at one TP/PP/VPP/DP layout loads at another. The distributed optimizer uses the "dp_reshardable" format
(megatron 0.16's default "fully_sharded_model_space" format raises on save).
"""
from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing

_DISTOPT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_state(engine) -> dict:
    return {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(engine.model)}


def _optimizer_state(engine, model_state: dict, is_loading: bool) -> dict:
    metadata = _DISTOPT if engine.config.parallel.distributed_optimizer else None
    return engine.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)


def save(engine, directory: Path) -> None:
    """Every rank writes its shards of model and optimizer into `directory` (collective)."""
    model_state = _model_state(engine)
    state = {"model": model_state, "optimizer": _optimizer_state(engine, model_state, is_loading=False)}
    dist_checkpointing.save(state, str(directory))


def load(engine, directory: Path, optimizer: bool = True) -> None:
    """Load model (and optimizer) state saved by `save`, at this run's parallel layout (collective)."""
    model_state = _model_state(engine)
    state = {"model": model_state}
    if optimizer:
        state["optimizer"] = _optimizer_state(engine, model_state, is_loading=True)
    loaded = dist_checkpointing.load(state, str(directory))
    for i, chunk in enumerate(engine.model):
        chunk.module.load_state_dict(loaded["model"][f"model{i}"])
    if optimizer:
        with torch.no_grad():
            engine.optimizer.load_state_dict(loaded["optimizer"])
    # The distributed optimizer keeps fp32 main params apart from the model's; refresh them from the model.
    if not optimizer and hasattr(engine.optimizer, "reload_model_params"):
        engine.optimizer.reload_model_params()
