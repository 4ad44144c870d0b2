"""muP initialisation of Crystal (crystal-spec §1.3), identical for every parallel layout.

Each weight is drawn in full from a generator seeded by (seed, global name), then this rank keeps its
tensor-parallel shard. So TP=2 x PP=2 starts from exactly the weights of a single process.
"""
from __future__ import annotations

import hashlib

import torch
from megatron.core import parallel_state as ps

from ..config.schema import ModelSection
from .names import global_named_parameters, param_kind


def init_std(model: ModelSection, kind: str) -> float | None:
    """Std of the truncated normal for a parameter kind; None means constant (norm weight 1, bias 0)."""
    return {"embedding": model.init.embedding_std, "hidden": model.init.hidden_std,
            "output": model.init.output_std}.get(kind)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if "linear_fc1" in name:
        # fc1 is [gate; up]; megatron's SwiGLU chunks the *local* output in two, so rank r holds
        # [gate_r; up_r], not a contiguous slice of the global [gate; up].
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


@torch.no_grad()
def init_crystal_weights(chunks: list[torch.nn.Module], model: ModelSection, seed: int) -> None:
    """Initialise every parameter of this rank's chunks in place."""
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for name, param in global_named_parameters(chunk):
            kind = param_kind(name, param.dim())
            std = init_std(model, kind)
            if std is None:
                param.fill_(1.0 if kind == "norm" and name.endswith(".weight") else 0.0)
                continue
            full_shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                full_shape[param.partition_dim] *= tp
            full = torch.empty(full_shape, dtype=torch.float32)
            bound = model.init.truncation * std
            torch.nn.init.trunc_normal_(full, 0.0, std, -bound, bound, generator=_generator(seed, name))
            param.copy_(_shard(full, param, name, tp, tp_rank))
