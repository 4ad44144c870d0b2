"""muP initialisation of Crystal (crystal-spec §1.3), identical for every parallel layout.

Each weight is drawn in full from a generator seeded by (seed, global name), then this rank keeps its
tensor-parallel shard. So TP=2 x PP=2 starts from exactly the weights of a single process.
"""
from __future__ import annotations

import hashlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from ..config.schema import ModelSection
from .names import global_named_parameters, global_shape, param_kind


def init_std(model: ModelSection, kind: str) -> float | None:
    """Std of the truncated normal for a parameter kind; None means constant (norm weight 1, bias 0)."""
    return {"embedding": model.init.embedding_std, "hidden": model.init.hidden_std,
            "output": model.init.output_std}.get(kind)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _split_dim(full_shape, local_shape, name: str, tp: int) -> int | None:
    """The dim that tensor parallelism splits (None when the parameter is replicated)."""
    dims = [d for d, (g, l) in enumerate(zip(full_shape, local_shape)) if g != l]
    if not dims:
        return None
    if len(dims) > 1 or full_shape[dims[0]] != local_shape[dims[0]] * tp:
        raise ValueError(f"{name}: local shape {tuple(local_shape)} is not 1/{tp} of {tuple(full_shape)}")
    return dims[0]


def _shard(full: torch.Tensor, dim: int | None, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """This rank's tensor-parallel piece of `full`, split along `dim`."""
    if dim is None:
        return full
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
            # megatron sets no partition attributes when it skips initialisation, so the split is found
            # by comparing the local shape with the unsplit one.
            full = torch.empty(global_shape(name, model), dtype=torch.float32)
            bound = model.init.truncation * std
            torch.nn.init.trunc_normal_(full, 0.0, std, -bound, bound, generator=_generator(seed, name))
            dim = _split_dim(full.shape, param.shape, name, tp)
            param.copy_(_shard(full, dim, name, tp, tp_rank))
            if dim is not None and not hasattr(param, "tensor_model_parallel"):
                # megatron marks split weights only when it initialises them itself; the grad norm and
                # checkpointing count a weight without the mark once per TP group instead of once per shard.
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
