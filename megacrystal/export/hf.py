"""Hugging Face CrystalCoder format: export (config.json, safetensors / pytorch_model.bin, tokenizer) and import.

The layout is LLM360's released `LLM360/Crystal` (crystal-spec §1.1 [CCT-HF], §4.2): model_type `crystalcoder`,
GPT-2 style names, Conv1D `[in, out]` weights, `c_attn` = q|k|v, `c_fc` = up, `c_fc2` = gate, the muP multipliers
in config.json (`mup_*`, not folded into the weights) and the tied `lm_head.weight` stored as well.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..checkpoint.manifest import honour_umask
from ..config import ConfigError
from . import keys
from .gather import Gathered

MODEL_TYPE = "crystalcoder"
ARCHITECTURE = "CrystalCoderLMHeadModel"
# LLM360's remote code; copy configuration_crystalcoder.py and modeling_crystalcoder.py from the LLM360/Crystal
# model repository next to config.json to load an export with transformers (trust_remote_code=True).
AUTO_MAP = {"AutoConfig": "configuration_crystalcoder.CrystalCoderConfig",
            "AutoModel": "modeling_crystalcoder.CrystalCoderModel",
            "AutoModelForCausalLM": "modeling_crystalcoder.CrystalCoderLMHeadModel"}
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_REQUIRED = ("n_embd", "n_layer", "n_head", "n_inner", "n_positions", "vocab_size", "rotary_dim",
             "mup_embeddings_scale", "mup_output_alpha", "mup_width_scale", "mup_scale_qk_dot_by_d")


def check_exportable(m, target: str) -> None:
    """Refuse models the target cannot express: its rotary is interleaved with base 10000."""
    if not m.rotary_interleaved or m.rotary_base != 10000:
        raise ConfigError(f"model.rotary_interleaved / model.rotary_base: {target} has only Crystal's interleaved "
                          f"rotary with base 10000 (this model: interleaved={m.rotary_interleaved}, "
                          f"base={m.rotary_base})")


def hf_config(m, bos_id: int = 1, eos_id: int = 2) -> dict:
    """config.json of a CrystalCoder model (m: ModelSection), key for key as LLM360's release."""
    check_exportable(m, "CrystalCoder")
    return {
        "attn_pdrop": 0.0, "scale_attn_weights": True, "resid_pdrop": 0.0,
        "mup_embeddings_scale": m.embeddings_scale,
        "n_inner": m.ffn_hidden_size, "n_embd": m.hidden_size, "layer_norm_epsilon": m.layernorm_eps,
        "n_positions": m.seq_length, "activation_function": "swiglu", "n_head": m.num_heads,
        "n_layer": m.num_layers,
        # output_logits_scale = mup_output_alpha * mup_width_scale (crystal-spec §1.2)
        "mup_output_alpha": m.output_logits_scale / m.mup_width_scale, "mup_width_scale": m.mup_width_scale,
        "position_embedding_type": "rotary", "rotary_dim": m.rotary_dim,
        "mup_scale_qk_dot_by_d": m.scale_qk_dot_by_d, "tie_word_embeddings": True,
        "vocab_size": m.vocab_size, "embd_pdrop": 0.0, "model_type": MODEL_TYPE, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "auto_map": dict(AUTO_MAP),
        "architectures": [ARCHITECTURE], "torch_dtype": "float32",
    }


def model_from_hf_config(cfg: dict, where: str) -> dict:
    """The `model:` section of a run config for a CrystalCoder config.json; CheckpointError for anything else."""
    model_type = cfg.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"{where} is a {model_type!r} model, not CrystalCoder (model_type "
                              f"{MODEL_TYPE!r}); megacrystal imports LLM360 Crystal/CrystalCoder checkpoints only")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}; it is not a complete CrystalCoder config.json")
    for key, want in (("activation_function", "swiglu"), ("position_embedding_type", "rotary"),
                      ("tie_word_embeddings", True)):
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{where}: {key} is {cfg[key]!r}; Crystal has {want!r}")
    head_dim = cfg["n_embd"] // cfg["n_head"]
    return {"num_layers": cfg["n_layer"], "hidden_size": cfg["n_embd"], "num_heads": cfg["n_head"],
            "ffn_hidden_size": cfg["n_inner"], "vocab_size": cfg["vocab_size"], "seq_length": cfg["n_positions"],
            "layernorm_eps": cfg.get("layer_norm_epsilon", 1e-5), "rotary_percent": cfg["rotary_dim"] / head_dim,
            "scale_qk_dot_by_d": bool(cfg["mup_scale_qk_dot_by_d"]),
            "embeddings_scale": cfg["mup_embeddings_scale"],
            "output_logits_scale": cfg["mup_output_alpha"] * cfg["mup_width_scale"],
            "mup_width_scale": cfg["mup_width_scale"]}


# -- export ------------------------------------------------------------------------------------------------------
def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group names (in order) into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + [current] if current else shards


def write_weights(out: Path, m, get: keys.Getter, fmt: str, max_bytes: int) -> list[str]:
    """Write the HF weights of a model as safetensors or a torch pickle, sharded with an index past max_bytes."""
    names = keys.hf_names(m.num_layers)
    sizes = {n: 4 * int(torch.Size(keys.hf_shape(n, m)).numel()) for n in names}
    shards = plan_shards(sizes, max_bytes)
    single, index = (SAFETENSORS, SAFETENSORS_INDEX) if fmt == "safetensors" else (BIN, BIN_INDEX)
    stem, ext = single.rsplit(".", 1)
    files, weight_map = [], {}
    for k, shard in enumerate(shards):
        fname = single if len(shards) == 1 else f"{stem}-{k + 1:05d}-of-{len(shards):05d}.{ext}"
        tensors = {}
        for name in shard:
            tensor = keys.hf_tensor(name, get, m.num_heads).float().contiguous()
            # lm_head.weight is the tied embedding: stored as its own copy, as in LLM360's release.
            tensors[name] = tensor.clone() if name == "lm_head.weight" else tensor
            weight_map[name] = fname
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            honour_umask(out / fname)  # safetensors writes 0600
        else:
            torch.save(tensors, out / fname)
        files.append(fname)
    if len(shards) > 1:
        (out / index).write_text(json.dumps({"metadata": {"total_size": sum(sizes.values())},
                                             "weight_map": weight_map}, indent=2) + "\n")
        files.append(index)
    return files


def write_tokenizer(tokenizer_model: Path, out: Path, m) -> list[str]:
    """tokenizer.model (SentencePiece) + tokenizer_config.json / special_tokens_map.json with the 18 StarCoder
    tokens at the ids the model was trained with."""
    from ..data.tokenizer import SPECIAL_TOKENS, CrystalTokenizer

    tok = CrystalTokenizer.load(tokenizer_model, padded_vocab_size=m.vocab_size)
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    unk, bos, eos = tok.id_to_token(0), tok.id_to_token(tok.bos_id), tok.id_to_token(tok.eos_id)

    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {str(i): added(tok.id_to_token(i)) for i in sorted({0, tok.bos_id, tok.eos_id})}
    decoder.update({str(tok.special_ids[t]): added(t) for t in SPECIAL_TOKENS})
    config = {"added_tokens_decoder": decoder, "additional_special_tokens": list(SPECIAL_TOKENS),
              "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": None,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "legacy": False, "model_max_length": m.seq_length, "padding_side": "right", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "unk_token": unk, "additional_special_tokens": list(SPECIAL_TOKENS)},
        indent=2) + "\n")
    return ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]


def export_hf(g: Gathered, out: Path, formats: tuple[str, ...] = ("safetensors",), max_shard_bytes: int = 5 << 30,
              tokenizer_model: Path | None = None) -> list[str]:
    """Write a CrystalCoder HF directory from gathered weights; return the files written."""
    m = g.config.model
    bos, eos = 1, 2
    if tokenizer_model is not None:
        from ..data.tokenizer import CrystalTokenizer

        tok = CrystalTokenizer.load(tokenizer_model, padded_vocab_size=m.vocab_size)
        bos, eos = tok.bos_id, tok.eos_id
    config = hf_config(m, bos, eos)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}, indent=2) + "\n")
    files = ["config.json", "generation_config.json"]
    for fmt in formats:
        files += write_weights(out, m, g.weights.__getitem__, fmt, max_shard_bytes)
    if tokenizer_model is not None:
        files += write_tokenizer(tokenizer_model, out, m)
    return files


# -- import ------------------------------------------------------------------------------------------------------
class HFWeights:
    """The tensors of an HF directory (safetensors or torch pickles, single or sharded), read lazily by name."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._open: dict[str, object] = {}
        for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
            if (directory / index).is_file():
                self.weight_map = json.loads((directory / index).read_text())["weight_map"]
                break
            if (directory / single).is_file():
                self.weight_map = {name: single for name in self._file(single).keys()}
                break
        else:
            raise CheckpointError(f"{directory} has no weights ({SAFETENSORS}, {BIN} or their .index.json)")

    def _file(self, fname: str):
        if fname not in self._open:
            path = self.dir / fname
            if not path.is_file():
                raise CheckpointError(f"{self.dir}: {fname} (named by the weight index) is missing")
            if fname.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[fname] = safe_open(str(path), framework="pt")
            else:
                self._open[fname] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[fname]

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def __call__(self, name: str) -> torch.Tensor:
        handle = self._file(self.weight_map[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]


def check_keys(found: set[str], expected: list[str], optional: set[str], ignored, where: str, what: str) -> None:
    """Strict key check: every expected key present, nothing unknown (beyond `optional` and `ignored(name)`)."""
    missing = [n for n in expected if n not in found and n not in optional]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} {what} weights (first: {missing[0]}); "
                              f"pass a complete checkpoint")
    unexpected = sorted(n for n in found if n not in set(expected) and not ignored(n))
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} weights a {what} model does not have "
                              f"(first: {unexpected[0]}); it is another architecture")


def import_hf(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, config_path: str | None = None,
              overrides=()) -> Path:
    """Write a CrystalCoder HF directory as a megacrystal checkpoint at tp x pp (collective); return its path."""
    from .writer import TensorSource, check_out_root, check_world, import_config, write_checkpoint

    d = Path(hf_dir).expanduser().absolute()
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads((d / "config.json").read_text())
    except ValueError:
        raise CheckpointError(f"{d / 'config.json'} is not valid JSON") from None
    model = model_from_hf_config(hf if isinstance(hf, dict) else {}, str(d / "config.json"))
    config = import_config(model, str(d), config_path, overrides)
    root = check_out_root(out)
    check_world(tp, pp)
    m = config.model
    weights = HFWeights(d)
    check_keys(weights.keys(), keys.hf_names(m.num_layers), {"lm_head.weight"},
               lambda n: any(n.endswith("." + b) for b in keys.HF_BUFFERS), str(d), "CrystalCoder")
    get = TensorSource(str(d), weights, lambda n: keys.hf_shape(n, m))
    if "lm_head.weight" in weights.keys() and not torch.equal(get("lm_head.weight"), get("transformer.wte.weight")):
        raise CheckpointError(f"{d}: lm_head.weight differs from transformer.wte.weight; Crystal ties them")
    return write_checkpoint(root, config, lambda name: keys.global_from_hf(name, get, m.num_heads), tp, pp,
                            {"format": "hf", "path": str(d)})
