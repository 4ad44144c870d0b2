"""Layout-independent parameter names: the same name for a weight under any TP/PP/VPP split."""
from __future__ import annotations

import re
from typing import Iterator

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
EMBEDDING = "embedding.word_embeddings.weight"
# Transformer Engine's layer spec fuses each LayerNorm into the linear after it; its parameters keep the local
# spec's names here, so init, optimizer groups and exports see one model whichever kernels run it.
_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_name(name: str) -> str:
    """A layer-local parameter name under the local spec's names (TE's fused-norm names mapped back)."""
    for fused, plain in _FUSED_NORMS.items():
        if name.endswith(fused):
            return name[:-len(fused)] + plain
    return name


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Yield (global name, parameter) for one model chunk.

    megatron names a pipeline stage's layers from 0; the layer's `layer_number` (1-based, global) gives
    the index in the whole model. The last stage's tied output weight is the embedding.
    """
    layers = chunk.decoder.layers
    for name, param in chunk.named_parameters():
        match = _LAYER.match(name)
        if match:
            index = layers[int(match.group(1))].layer_number - 1
            name = f"decoder.layers.{index}." + canonical_name(name[match.end():])
        elif name == "output_layer.weight":
            name = EMBEDDING
        yield name, param


def param_kind(name: str, ndim: int) -> str:
    """Crystal's muP role of a parameter: embedding, hidden (2-D kernels), output (2-D projections), norm, bias."""
    name = canonical_name(name)
    if name == EMBEDDING or name.startswith("output_layer."):
        return "embedding"
    if name.endswith(".bias"):
        return "bias"
    if "layernorm" in name:
        return "norm"
    if ndim == 2 and (name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight")):
        return "output"
    if ndim == 2:
        return "hidden"
    raise ValueError(f"unclassified parameter {name} (ndim {ndim})")


def global_shape(name: str, m) -> tuple[int, ...]:
    """Shape of a parameter in the unsplit model (m: ModelSection); megatron's TP shards divide one dim."""
    h, f = m.hidden_size, m.ffn_hidden_size
    if name == EMBEDDING:
        return (m.vocab_size, h)
    shapes = {
        "self_attention.linear_qkv.weight": (3 * h, h), "self_attention.linear_qkv.bias": (3 * h,),
        "self_attention.linear_proj.weight": (h, h), "self_attention.linear_proj.bias": (h,),
        "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc1.bias": (2 * f,),
        "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,),
    }
    for suffix, shape in shapes.items():
        if name.endswith(suffix):
            return shape
    if "layernorm" in name:
        return (h,)
    raise ValueError(f"no global shape for parameter {name}")
