"""Independent plain-PyTorch Crystal models built from exported files, written from crystal-spec §1.2 and §4.2.

One reads a CrystalCoder Hugging Face directory, one a Cerebras `.mdl` + params.yaml; both check the key set
exactly (nothing missing, nothing unexpected). Neither uses megacrystal.export: the names are spelled out here
from the spec's tables and the math is tests/model/reference.py's formulas.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from tests.model.reference import crystal_logits

HF_LAYER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_fc2.weight",
            "mlp.c_fc2.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
CS_LAYER = [f"{m}.{p}" for m in ("self_attn.proj_q_dense_layer", "self_attn.proj_k_dense_layer",
                                 "self_attn.proj_v_dense_layer", "self_attn.proj_output_dense_layer", "norm1",
                                 "norm3", "ffn.ffn.0.linear_layer", "ffn.ffn.0.linear_layer_for_glu",
                                 "ffn.ffn.1.linear_layer") for p in ("weight", "bias")]


def hf_expected_keys(n_layer: int) -> set[str]:
    return ({"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"}
            | {f"transformer.h.{i}.{k}" for i in range(n_layer) for k in HF_LAYER})


def cs_expected_keys(n_layer: int) -> set[str]:
    return ({"embedding_layer.word_embeddings.weight", "transformer_decoder.norm.weight",
             "transformer_decoder.norm.bias", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
            | {f"transformer_decoder.layers.{i}.{k}" for i in range(n_layer) for k in CS_LAYER})


def read_hf(directory: str | Path, fmt: str = "safetensors") -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of an HF directory, in the given weight format (single file or sharded)."""
    d = Path(directory)
    cfg = json.loads((d / "config.json").read_text())
    single, index = ("model.safetensors", "model.safetensors.index.json") if fmt == "safetensors" else \
        ("pytorch_model.bin", "pytorch_model.bin.index.json")
    files = sorted(set(json.loads((d / index).read_text())["weight_map"].values())) if (d / index).exists() \
        else [single]
    sd = {}
    for f in files:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            part = load_file(str(d / f))
        else:
            part = torch.load(d / f, weights_only=True)
        assert not set(part) & set(sd), f"{f} repeats tensors"
        sd.update(part)
    return cfg, sd


def hf_logits_fn(cfg: dict, sd: dict[str, torch.Tensor]):
    """Logits function of a CrystalCoder HF checkpoint (Conv1D [in, out]; c_attn = q|k|v; c_fc up; c_fc2 gate)."""
    assert cfg["model_type"] == "crystalcoder" and cfg["architectures"] == ["CrystalCoderLMHeadModel"]
    assert cfg["activation_function"] == "swiglu" and cfg["position_embedding_type"] == "rotary"
    assert cfg["tie_word_embeddings"] and cfg["mup_scale_qk_dot_by_d"]  # the oracle divides scores by d_head
    n_layer, h = cfg["n_layer"], cfg["n_embd"]
    missing, unexpected = hf_expected_keys(n_layer) - set(sd), set(sd) - hf_expected_keys(n_layer)
    assert not missing and not unexpected, (sorted(missing)[:3], sorted(unexpected)[:3])
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    w = {"wte": sd["transformer.wte.weight"], "ln_f.weight": sd["transformer.ln_f.weight"],
         "ln_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(n_layer):
        p, s = f"h.{i}.", f"transformer.h.{i}."
        c_attn, c_attn_b = sd[s + "attn.c_attn.weight"], sd[s + "attn.c_attn.bias"]
        assert c_attn.shape == (h, 3 * h)
        for j, name in enumerate("qkv"):  # Conv1D: y = x @ W + b, columns q | k | v
            w[p + f"attn.{name}.weight"] = c_attn[:, j * h:(j + 1) * h].t()
            w[p + f"attn.{name}.bias"] = c_attn_b[j * h:(j + 1) * h]
        for mine, theirs in (("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.gate", "mlp.c_fc2"),
                             ("mlp.down", "mlp.c_proj")):
            w[p + mine + ".weight"], w[p + mine + ".bias"] = sd[s + theirs + ".weight"].t(), sd[s + theirs + ".bias"]
        for ln in ("ln_1", "ln_2"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = sd[s + ln + ".weight"], sd[s + ln + ".bias"]
    kwargs = dict(num_layers=n_layer, num_heads=cfg["n_head"], rotary_dim=cfg["rotary_dim"], rotary_base=10000.0,
                  eps=cfg["layer_norm_epsilon"], embeddings_scale=cfg["mup_embeddings_scale"],
                  output_logits_scale=cfg["mup_output_alpha"] * cfg["mup_width_scale"])
    return lambda tokens: crystal_logits(w, tokens, **kwargs), cfg["n_positions"]


def read_cs(mdl: str | Path, params: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Model Zoo params.yaml and the unprefixed state dict of a `.mdl` torch pickle."""
    p = yaml.safe_load(Path(params).read_text())
    obj = torch.load(mdl, weights_only=True)
    assert set(obj) == {"model"} and "state_version" not in obj  # 1.9's verified form: unprefixed keys
    return p, obj["model"]


def cs_logits_fn(params: dict, sd: dict[str, torch.Tensor]):
    """Logits function of a CS GPT-2/3 Crystal: proj_{q,k,v}, linear_layer = up, linear_layer_for_glu = gate."""
    if "trainer" in params:  # 2.x: muP as base width
        m = params["trainer"]["init"]["model"]
        logits_scale = m["output_logits_alpha"] * m["mup_base_hidden_size"] / m["hidden_size"]
    else:
        m = params["model"]
        logits_scale = m["output_logits_scale"]
    assert m["nonlinearity"] == "swiglu" and m["position_embedding_type"] == "rotary"
    assert m["share_embedding_weights"] and not m["use_bias_in_output"] and m["scale_qk_dot_by_d"]
    n_layer = m["num_hidden_layers"]
    missing, unexpected = cs_expected_keys(n_layer) - set(sd), set(sd) - cs_expected_keys(n_layer)
    assert not missing and not unexpected, (sorted(missing)[:3], sorted(unexpected)[:3])
    assert torch.equal(sd["lm_head.weight"], sd["embedding_layer.word_embeddings.weight"])
    for x in ("weight", "bias"):
        assert torch.equal(sd[f"ln_f.{x}"], sd[f"transformer_decoder.norm.{x}"])
    w = {"wte": sd["embedding_layer.word_embeddings.weight"], "ln_f.weight": sd["transformer_decoder.norm.weight"],
         "ln_f.bias": sd["transformer_decoder.norm.bias"]}
    for i in range(n_layer):
        p, s = f"h.{i}.", f"transformer_decoder.layers.{i}."
        for mine, theirs in (("attn.q", "self_attn.proj_q_dense_layer"), ("attn.k", "self_attn.proj_k_dense_layer"),
                             ("attn.v", "self_attn.proj_v_dense_layer"),
                             ("attn.proj", "self_attn.proj_output_dense_layer"), ("ln_1", "norm1"), ("ln_2", "norm3"),
                             ("mlp.up", "ffn.ffn.0.linear_layer"), ("mlp.gate", "ffn.ffn.0.linear_layer_for_glu"),
                             ("mlp.down", "ffn.ffn.1.linear_layer")):
            w[p + mine + ".weight"], w[p + mine + ".bias"] = sd[s + theirs + ".weight"], sd[s + theirs + ".bias"]
    kwargs = dict(num_layers=n_layer, num_heads=m["num_heads"], rotary_dim=m["rotary_dim"], rotary_base=10000.0,
                  eps=m["layer_norm_epsilon"], embeddings_scale=m["embeddings_scale"], output_logits_scale=logits_scale)
    return lambda tokens: crystal_logits(w, tokens, **kwargs), m["max_position_embeddings"]


@torch.no_grad()
def window_nll(logits_fn, tokens: list[int], seq_length: int) -> tuple[int, float]:
    """(scored tokens, mean NLL): windows of seq_length inputs from positions 0, S, 2S, ..., each input scored on
    the token after it, each window starting again at position 0."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_length):
        labels = tokens[start + 1:start + seq_length + 1]
        inputs = tokens[start:start + len(labels)]
        logits = logits_fn(torch.tensor([inputs]))[0]
        total += float(F.cross_entropy(logits.float(), torch.tensor(labels), reduction="sum").double())
        count += len(labels)
    return count, total / count
