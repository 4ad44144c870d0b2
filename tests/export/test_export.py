"""Export to HF and Cerebras, import back, score: exact round trips and independent readers of the files.

One 2-rank spawn (tests/export/runs.py) trains a tiny Crystal at TP=2 and runs every megatron-side command;
the checks on the exported files run here in plain PyTorch (tests/export/readers.py).
"""
import json
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import run_on_ranks

from .readers import cs_logits_fn, hf_logits_fn, read_cs, read_hf, window_nll
from .runs import MODEL, pipeline

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from megacrystal.data.tokenizer import CrystalTokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("export")
    corpus = tmp / "corpus.txt"
    text = "\n".join(p.read_text() for p in sorted((ROOT / "megacrystal").rglob("*.py"))[:40])
    corpus.write_text(text.encode("ascii", "ignore").decode())
    tokenizer = train_tokenizer([corpus], tmp / "tok", 400)
    text = (ROOT / "README.md").read_text()[:2500]
    (tmp / "text.txt").write_text(text)
    text_ids = CrystalTokenizer.load(tokenizer, padded_vocab_size=MODEL["vocab_size"]).encode(text)
    rng = random.Random(7)
    tokens = [rng.randrange(MODEL["vocab_size"]) for _ in range(150)]  # 149 scored: 4 full windows + 21
    (tmp / "tokens.json").write_text(json.dumps(tokens))
    result = run_on_ranks(pipeline, 2, str(tmp), str(tokenizer), str(tmp / "tokens.json"), str(tmp / "text.txt"))[0]
    return {"tmp": tmp, "r": result, "tokens": tokens, "text_ids": text_ids}


def test_round_trips_through_hf_and_cerebras_are_exact(exported):
    r = exported["r"]
    assert r["diff"] == {"hf": 0.0, "cs19": 0.0, "cs2x": 0.0}
    # The trainer's own weights-only load of the imported checkpoint (at PP=2) gives the trained weights too.
    assert r["engine_load_diff"] == 0.0


def test_training_continues_from_imported_weights(exported):
    r = exported["r"]
    assert len(r["continued_losses"]) == 4  # a fresh run: all its steps, from step 0
    # Its first batch is the original run's first batch; the imported (trained) weights do better on it.
    assert r["continued_losses"][0] < r["first_loss_from_init"] - 0.01


def test_score_is_the_same_at_every_layout_and_after_import(exported):
    scores = exported["r"]["scores"]
    ref = scores["tp2"]
    assert ref["tokens"] == len(exported["tokens"]) - 1
    for name in ("pp2", "from_hf_pp2", "from_cs19_tp2"):
        assert scores[name]["tokens"] == ref["tokens"]
        assert scores[name]["nll"] == pytest.approx(ref["nll"], rel=1e-6), name


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_independent_hf_reader_reproduces_score(exported, fmt):
    cfg, sd = read_hf(exported["tmp"] / "hf", fmt)
    logits_fn, seq = hf_logits_fn(cfg, sd)
    count, nll = window_nll(logits_fn, exported["tokens"], seq)
    ref = exported["r"]["scores"]["tp2"]
    assert count == ref["tokens"] and nll == pytest.approx(ref["nll"], rel=1e-5)


@pytest.mark.parametrize("release", ["cs19", "cs2x"])
def test_independent_cs_reader_reproduces_score(exported, release):
    out = exported["tmp"] / release
    params, sd = read_cs(out / "checkpoint_4.mdl", out / "main" / "params.yaml")
    logits_fn, seq = cs_logits_fn(params, sd)
    count, nll = window_nll(logits_fn, exported["tokens"], seq)
    ref = exported["r"]["scores"]["tp2"]
    assert count == ref["tokens"] and nll == pytest.approx(ref["nll"], rel=1e-5)


def test_text_score_uses_the_runs_tokenizer(exported):
    cfg, sd = read_hf(exported["tmp"] / "hf")
    count, nll = window_nll(hf_logits_fn(cfg, sd)[0], exported["text_ids"], cfg["n_positions"])
    got = exported["r"]["scores"]["dp2_text"]
    assert got["tokens"] == count and got["nll"] == pytest.approx(nll, rel=1e-5)


def test_hf_directory_layout(exported):
    out = exported["tmp"] / "hf"
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        assert (out / name).is_file(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # --max-shard-size made it shard
    assert index["metadata"]["total_size"] == 4 * (exported["r"]["weights_numel"] + MODEL["vocab_size"] * 64)
    tok = json.loads((out / "tokenizer_config.json").read_text())
    from megacrystal.data.tokenizer import SPECIAL_TOKENS

    base = 400
    assert tok["additional_special_tokens"] == list(SPECIAL_TOKENS)
    assert {int(i): t["content"] for i, t in tok["added_tokens_decoder"].items() if int(i) >= base} == \
        {base + i: name for i, name in enumerate(SPECIAL_TOKENS)}
    assert "wrote" in exported["r"]["export_hf"]


def test_exported_weights_honour_the_umask(exported):
    """safetensors writes its files 0600; an export (and a checkpoint) gets the mode of any other new file."""
    from megacrystal.checkpoint.manifest import file_mode

    out = exported["tmp"] / "hf"
    weights = sorted(out.glob("model*.safetensors")) + sorted(out.glob("pytorch_model*.bin"))
    assert weights
    assert {oct(p.stat().st_mode & 0o777) for p in [*weights, out / "config.json"]} == {oct(file_mode())}


def test_cs_mdl_shares_the_aliased_tensors_and_commands_are_printed(exported):
    obj = torch.load(exported["tmp"] / "cs19" / "checkpoint_4.mdl", weights_only=True)["model"]
    assert obj["lm_head.weight"].data_ptr() == obj["embedding_layer.word_embeddings.weight"].data_ptr()
    assert obj["ln_f.weight"].data_ptr() == obj["transformer_decoder.norm.weight"].data_ptr()
    out19, out2x = exported["r"]["export_cs19"], exported["r"]["export_cs2x"]
    assert "checkpoint_4.mdl (42 CS keys)" in out19  # 2 layers x 18 + embedding + 2 final norm + 3 aliases
    assert "the checkpoint ends the run's last phase" in out19
    assert "wrote" in out2x and (exported["tmp"] / "cs2x" / "main" / "params.yaml").is_file()


def test_deepspeed_checkpoints_export_the_same_model(exported):
    ds, ref = exported["r"]["deepspeed"], exported["r"]["scores"]["tp2"]
    assert "zero_to_fp32" in ds["zero1_dp2"]["source"] and "merged from 2 TP shards" in ds["zero0_tp2"]["source"]
    for name, got in ds.items():
        assert got["diff"] < 1e-5, name  # same init, batches and AdamW as the megatron run: float noise only
        assert got["score"]["nll"] == pytest.approx(ref["nll"], rel=1e-5), name


def test_bf16_runs_export_their_fp32_master_weights(exported):
    bf16 = exported["r"]["bf16"]
    assert "optimizer.state.param" in bf16["distopt_dp2"]["source"]  # distributed optimizer
    assert "optimizer.state.fp32_param" in bf16["tp2"]["source"]  # mixed-precision optimizer
    for name, got in bf16.items():
        assert got["dtypes"] == ["torch.float32"] and got["rounds_to_model"], name
        assert got["finer_than_bf16"] > 1000, name  # not just the bf16 copy cast up
