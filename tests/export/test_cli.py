"""The export commands as operators run them: params-only Cerebras export of the 7B, and one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def megacrystal(*args):
    return subprocess.run([sys.executable, "-m", "megacrystal", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ), timeout=300)


def one_line_error(out, message: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megacrystal: error:") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_params_only_export_of_the_7b_prints_the_cs2_commands(tmp_path):
    out = megacrystal("export", "cerebras", "--config", "configs/crystal-7b.yaml", "--out", tmp_path / "cs",
                      "--num-csx", "16", "--modelzoo", "/opt/modelzoo")
    assert out.returncode == 0, out.stderr
    for phase in ("phase1", "phase2", "phase3"):
        assert (tmp_path / "cs" / phase / "params.yaml").is_file()
    commands = [line for line in out.stdout.splitlines() if "gpt3/run.py CSX" in line]
    assert len(commands) == 3
    assert "--num_csx 16 --num_workers_per_csx 1" in commands[0] and "--checkpoint_path" not in commands[0]
    # phase 2 starts from phase 1's last Model Zoo checkpoint, phase 3 from phase 2's
    assert "--checkpoint_path model_dir/phase1/checkpoint_79721.mdl" in commands[1]
    assert "--checkpoint_path model_dir/phase2/checkpoint_294108.mdl" in commands[2]  # its global step


def test_unknown_cs_release_fails_in_one_line(tmp_path):
    out = megacrystal("export", "cerebras", "--config", "configs/crystal-7b.yaml", "--out", tmp_path,
                      "--cs-release", "3.0")
    one_line_error(out, "--cs-release '3.0': unknown Cerebras release; choose 1.9")


def test_not_a_checkpoint_fails_in_one_line(tmp_path):
    (tmp_path / "tokens.json").write_text("[1, 2, 3]")
    one_line_error(megacrystal("score", "--checkpoint", tmp_path, "--tokens-file", tmp_path / "tokens.json"),
                   f"{tmp_path} is not a checkpoint (no manifest.json)")
    one_line_error(megacrystal("export", "hf", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "hf"),
                   "is not a checkpoint (no such directory)")


def _hf_dir(path: Path, model_type="crystalcoder", drop=(), extra=()) -> Path:
    """A tiny CrystalCoder-format directory with random weights (some dropped, some extra)."""
    from safetensors.torch import save_file

    from megacrystal.config import config_from_dict
    from megacrystal.export import hf, keys

    m = config_from_dict({"model": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "ffn_hidden_size": 24,
                                    "vocab_size": 64, "seq_length": 8, "rotary_percent": 0.5},
                          "optim": {"lr": 0.1}, "train": {"steps": 1, "global_batch_size": 1}}).model
    path.mkdir()
    config = hf.hf_config(m)
    config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    tensors = {n: torch.randn(keys.hf_shape(n, m)) for n in keys.hf_names(1) if n not in drop}
    tensors.update({n: torch.zeros(2) for n in extra})
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("kind, message", [
    ("llama", "is a 'llama' model, not CrystalCoder (model_type 'crystalcoder')"),
    ("missing", "lacks 2 CrystalCoder weights (first: transformer.h.0.mlp.c_fc2.weight)"),
    ("unexpected", "has 1 weights a CrystalCoder model does not have (first: transformer.h.0.attn.q_proj.weight)"),
])
def test_foreign_or_incomplete_hf_directory_fails_in_one_line(tmp_path, kind, message):
    missing = ("transformer.h.0.mlp.c_fc2.weight", "transformer.h.0.mlp.c_fc2.bias")
    # attn.bias is a causal-mask buffer LLM360's checkpoint carries: accepted, not a weight
    unexpected = ("transformer.h.0.attn.q_proj.weight", "transformer.h.0.attn.bias")
    d = _hf_dir(tmp_path / "hf", model_type="llama" if kind == "llama" else "crystalcoder",
                drop=missing if kind == "missing" else (), extra=unexpected if kind == "unexpected" else ())
    out = megacrystal("import", "hf", "--hf-dir", d, "--out", tmp_path / "ckpt")
    one_line_error(out, message)
    assert not (tmp_path / "ckpt").exists()


def test_not_a_torch_pickle_mdl_fails_in_one_line(tmp_path):
    (tmp_path / "x.mdl").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    out = megacrystal("export", "cerebras", "--config", "configs/crystal-7b.yaml", "--out", tmp_path / "cs")
    assert out.returncode == 0, out.stderr
    one_line_error(megacrystal("import", "cerebras", "--mdl", tmp_path / "x.mdl", "--params",
                               tmp_path / "cs" / "phase1" / "params.yaml", "--out", tmp_path / "ckpt"),
                   "is not a torch-pickle CS checkpoint")


def test_import_with_a_config_of_another_model_fails_in_one_line(tmp_path):
    d = _hf_dir(tmp_path / "hf")
    out = megacrystal("import", "hf", "--hf-dir", d, "--out", tmp_path / "ckpt",
                      "--config", "configs/crystal-tiny.yaml")
    one_line_error(out, "model.num_layers: 4 in configs/crystal-tiny.yaml, but 1 in")
