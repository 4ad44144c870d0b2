"""Weight names and layouts: megacrystal's global names <-> Cerebras Model Zoo GPT-2/3 <-> CrystalCoder HF.

Global names are the unsplit model's state-dict names (model/names.py). The traps (crystal-spec §4.2,
crystal-on-megatron-core.md §4-5): megatron's `linear_qkv` is per head `[q_h; k_h; v_h]`, while CS keeps q, k, v
apart and HF's Conv1D `c_attn` is `[in, q|k|v]`; megatron's `linear_fc1` is `[gate; up]`, CS's `linear_layer` is
up and `linear_layer_for_glu` the gate, HF's `c_fc` is up and `c_fc2` the gate; HF Conv1D weights are `[in, out]`.
Every conversion is a pure function of tensors (meta tensors too), one target tensor at a time, so a 7B model is
converted without a second full copy in memory.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from ..model.names import EMBEDDING, global_shape

Getter = Callable[[str], torch.Tensor]

FINAL_NORM = "decoder.final_layernorm"
LAYER_PARAMS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
)


def global_names(num_layers: int) -> list[str]:
    """Every parameter of the unsplit model (the tied output weight is the embedding)."""
    layers = [f"decoder.layers.{i}.{p}" for i in range(num_layers) for p in LAYER_PARAMS]
    return [EMBEDDING, *layers, f"{FINAL_NORM}.weight", f"{FINAL_NORM}.bias"]


def global_shapes(m) -> dict[str, tuple[int, ...]]:
    """{global name: unsplit shape} of a model (m: config ModelSection)."""
    return {name: global_shape(name, m) for name in global_names(m.num_layers)}


# -- re-layouts (pure) -----------------------------------------------------------------------------------------
def qkv_from_separate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q, k, v ([H, in] weights or [H] biases, heads contiguous) -> megatron's per-head [q_h; k_h; v_h] rows."""
    rest = q.shape[1:]
    dh = q.shape[0] // num_heads
    stacked = torch.stack([t.reshape(num_heads, dh, *rest) for t in (q, k, v)], dim=1)  # [nh, 3, dh, ...]
    return stacked.reshape(3 * q.shape[0], *rest)


def qkv_to_separate(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's per-head [q_h; k_h; v_h] rows -> (q, k, v), each [H, ...] with heads contiguous."""
    rest = qkv.shape[1:]
    dh = qkv.shape[0] // (3 * num_heads)
    view = qkv.reshape(num_heads, 3, dh, *rest)
    return tuple(view[:, j].reshape(num_heads * dh, *rest).contiguous() for j in range(3))  # type: ignore


def fc1_from_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate (inside silu) and up -> megatron's linear_fc1 = [gate; up]."""
    return torch.cat([gate, up], dim=0)


def fc1_to_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's linear_fc1 = [gate; up] -> (gate, up)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def _t(x: torch.Tensor) -> torch.Tensor:
    """nn.Linear [out, in] <-> HF Conv1D [in, out]."""
    return x.t().contiguous()


def _layer_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)\.(weight|bias)")


_GLOBAL_LAYER = _layer_pattern("decoder.layers")


def _layer_parts(name: str, pattern: re.Pattern, kind: str) -> tuple[int, str, str]:
    """A per-layer key's (layer, module, param), e.g. 'decoder.layers.3.mlp.linear_fc1.bias' ->
    (3, 'mlp.linear_fc1', 'bias'), in any of the three namings; KeyError('not a <kind>: name') otherwise."""
    match = pattern.fullmatch(name)
    if match is None:
        raise KeyError(f"not a {kind}: {name}")
    return int(match.group(1)), match.group(2), match.group(3)


# -- Cerebras Model Zoo GPT-2/3 (crystal-spec §4.2) ---------------------------------------------------------------
_CS_LAYER = _layer_pattern("transformer_decoder.layers")
_CS_FROM_GLOBAL_SIMPLE = {
    "norm1": "input_layernorm",
    "norm3": "pre_mlp_layernorm",
    "self_attn.proj_output_dense_layer": "self_attention.linear_proj",
    "ffn.ffn.1.linear_layer": "mlp.linear_fc2",
}
_CS_QKV = {"self_attn.proj_q_dense_layer": 0, "self_attn.proj_k_dense_layer": 1, "self_attn.proj_v_dense_layer": 2}
_CS_FC1 = {"ffn.ffn.0.linear_layer_for_glu": 0, "ffn.ffn.0.linear_layer": 1}  # gate, up
CS_ALIASES = {"ln_f.weight": "transformer_decoder.norm.weight", "ln_f.bias": "transformer_decoder.norm.bias",
              "lm_head.weight": "embedding_layer.word_embeddings.weight"}


def cs_names(num_layers: int) -> list[str]:
    """The complete CS GPT2LMHeadModel state-dict key set of a Crystal model, aliases included (unprefixed)."""
    layer = [f"{mod}.{p}" for mod in ("self_attn.proj_q_dense_layer", "self_attn.proj_k_dense_layer",
                                      "self_attn.proj_v_dense_layer", "self_attn.proj_output_dense_layer",
                                      "norm1", "norm3", "ffn.ffn.0.linear_layer", "ffn.ffn.0.linear_layer_for_glu",
                                      "ffn.ffn.1.linear_layer") for p in ("weight", "bias")]
    return ["embedding_layer.word_embeddings.weight",
            *[f"transformer_decoder.layers.{i}.{p}" for i in range(num_layers) for p in layer],
            "transformer_decoder.norm.weight", "transformer_decoder.norm.bias", *CS_ALIASES]


def cs_tensor(name: str, get: Getter, num_heads: int) -> torch.Tensor:
    """The CS tensor `name`, built from global tensors (`get(global_name)`)."""
    name = CS_ALIASES.get(name, name)
    if name == "embedding_layer.word_embeddings.weight":
        return get(EMBEDDING)
    if name.startswith("transformer_decoder.norm."):
        return get(f"{FINAL_NORM}.{name.rsplit('.', 1)[1]}")
    i, module, param = _layer_parts(name, _CS_LAYER, "CS Crystal key")
    prefix = f"decoder.layers.{i}."
    if module in _CS_FROM_GLOBAL_SIMPLE:
        return get(f"{prefix}{_CS_FROM_GLOBAL_SIMPLE[module]}.{param}")
    if module in _CS_QKV:
        return qkv_to_separate(get(f"{prefix}self_attention.linear_qkv.{param}"), num_heads)[_CS_QKV[module]]
    if module in _CS_FC1:
        return fc1_to_gate_up(get(f"{prefix}mlp.linear_fc1.{param}"))[_CS_FC1[module]]
    raise KeyError(f"not a CS Crystal key: {name}")


def global_from_cs(name: str, get: Getter, num_heads: int) -> torch.Tensor:
    """The global tensor `name`, built from CS tensors (`get(cs_name)`, unprefixed)."""
    if name == EMBEDDING:
        return get("embedding_layer.word_embeddings.weight")
    if name.startswith(FINAL_NORM + "."):
        return get(f"transformer_decoder.norm.{name.rsplit('.', 1)[1]}")
    i, module, param = _layer_parts(name, _GLOBAL_LAYER, "megacrystal parameter")
    prefix = f"transformer_decoder.layers.{i}."
    for cs, mine in _CS_FROM_GLOBAL_SIMPLE.items():
        if module == mine:
            return get(f"{prefix}{cs}.{param}")
    if module == "self_attention.linear_qkv":
        q, k, v = (get(f"{prefix}{cs}.{param}") for cs in _CS_QKV)
        return qkv_from_separate(q, k, v, num_heads)
    if module == "mlp.linear_fc1":
        return fc1_from_gate_up(get(f"{prefix}ffn.ffn.0.linear_layer_for_glu.{param}"),
                                get(f"{prefix}ffn.ffn.0.linear_layer.{param}"))
    raise KeyError(f"not a megacrystal parameter: {name}")


# -- Hugging Face CrystalCoderLMHeadModel (crystal-spec §4.2, §1.5) -----------------------------------------------
_HF_LAYER = _layer_pattern("transformer.h")
_HF_NORMS = {"ln_1": "input_layernorm", "ln_2": "pre_mlp_layernorm"}
_HF_CONV = {"attn.c_proj": "self_attention.linear_proj", "mlp.c_proj": "mlp.linear_fc2"}
HF_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers some HF checkpoints carry; not weights


def hf_names(num_layers: int) -> list[str]:
    """The weights of a CrystalCoder HF checkpoint, with the tied `lm_head.weight` stored as in LLM360's release."""
    layer = [f"{mod}.{p}" for mod in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_fc2",
                                      "mlp.c_proj") for p in ("weight", "bias")]
    return ["transformer.wte.weight", *[f"transformer.h.{i}.{p}" for i in range(num_layers) for p in layer],
            "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]


def hf_tensor(name: str, get: Getter, num_heads: int) -> torch.Tensor:
    """The HF tensor `name`, built from global tensors (`get(global_name)`)."""
    if name in ("transformer.wte.weight", "lm_head.weight"):
        return get(EMBEDDING)
    if name.startswith("transformer.ln_f."):
        return get(f"{FINAL_NORM}.{name.rsplit('.', 1)[1]}")
    i, module, param = _layer_parts(name, _HF_LAYER, "CrystalCoder HF key")
    prefix = f"decoder.layers.{i}."
    if module in _HF_NORMS:
        return get(f"{prefix}{_HF_NORMS[module]}.{param}")
    if module in _HF_CONV:
        x = get(f"{prefix}{_HF_CONV[module]}.{param}")
        return _t(x) if param == "weight" else x
    if module == "attn.c_attn":  # Conv1D [in, q|k|v], heads contiguous inside each
        q, k, v = qkv_to_separate(get(f"{prefix}self_attention.linear_qkv.{param}"), num_heads)
        qkv = torch.cat([q, k, v], dim=0)
        return _t(qkv) if param == "weight" else qkv
    if module in ("mlp.c_fc", "mlp.c_fc2"):  # c_fc = up, c_fc2 = gate
        gate, up = fc1_to_gate_up(get(f"{prefix}mlp.linear_fc1.{param}"))
        x = up if module == "mlp.c_fc" else gate
        return _t(x) if param == "weight" else x
    raise KeyError(f"not a CrystalCoder HF key: {name}")


def global_from_hf(name: str, get: Getter, num_heads: int) -> torch.Tensor:
    """The global tensor `name`, built from HF tensors (`get(hf_name)`)."""
    if name == EMBEDDING:
        return get("transformer.wte.weight")
    if name.startswith(FINAL_NORM + "."):
        return get(f"transformer.ln_f.{name.rsplit('.', 1)[1]}")
    i, module, param = _layer_parts(name, _GLOBAL_LAYER, "megacrystal parameter")
    prefix = f"transformer.h.{i}."

    def linear(hf_module: str) -> torch.Tensor:
        x = get(f"{prefix}{hf_module}.{param}")
        return _t(x) if param == "weight" else x

    for hf, mine in _HF_NORMS.items():
        if module == mine:
            return get(f"{prefix}{hf}.{param}")
    for hf, mine in _HF_CONV.items():
        if module == mine:
            return linear(hf)
    if module == "self_attention.linear_qkv":
        q, k, v = linear("attn.c_attn").chunk(3, dim=0)
        return qkv_from_separate(q, k, v, num_heads)
    if module == "mlp.linear_fc1":
        return fc1_from_gate_up(linear("mlp.c_fc2"), linear("mlp.c_fc"))
    raise KeyError(f"not a megacrystal parameter: {name}")


def hf_shape(name: str, m) -> tuple[int, ...]:
    """Shape of HF tensor `name` of a model (m: ModelSection), without building anything."""
    h, f = m.hidden_size, m.ffn_hidden_size
    if name in ("transformer.wte.weight", "lm_head.weight"):
        return (m.vocab_size, h)
    module, param = name.rsplit(".", 1)
    module = module.split(".", 3)[-1] if module.startswith("transformer.h.") else module
    if module.endswith("c_attn"):
        return (h, 3 * h) if param == "weight" else (3 * h,)
    if module == "mlp.c_fc" or module == "mlp.c_fc2":
        return (h, f) if param == "weight" else (f,)
    if module == "mlp.c_proj":
        return (f, h) if param == "weight" else (h,)
    if module == "attn.c_proj":
        return (h, h) if param == "weight" else (h,)
    return (h,)  # the LayerNorms
