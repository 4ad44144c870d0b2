"""The megatron side of the export tests, run on 2 gloo ranks by test_export.py (one spawn for everything)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

MODEL = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96, "vocab_size": 448,
         "seq_length": 32}


def run_config(run_dir: str, tokenizer: str, **extra) -> dict:
    """A tiny Crystal on the synthetic stream (4 steps, checkpoint at the end), with a real tokenizer."""
    return {"model": MODEL, "optim": {"lr": 0.01, "warmup_steps": 2},
            "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "threads": 1},
            "run": {"dir": run_dir}, "data": {"tokenizer": {"model": tokenizer}}, **extra}


def cli(*argv: str) -> str:
    """Run `megacrystal ARGV` in this rank; return what it printed (rank 0) and fail on a non-zero exit."""
    from megacrystal.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    assert code == 0, f"megacrystal {' '.join(argv)} exited {code}"
    return out.getvalue()


def _score(ckpt: str, *args: str) -> dict | None:
    import json

    text = cli("score", "--checkpoint", ckpt, *args)
    return json.loads(text.strip().splitlines()[-1]) if text.strip() else None


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:3]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _engine_weights(config_dict: dict, ckpt: str, use_engine_load: bool) -> dict:
    """This rank's parameters after loading `ckpt` into a MegatronEngine at the config's layout, either through
    the engine's own weights-only load (what the trainer does) or the export's fp32-master loader."""
    from megacrystal.config import config_from_dict
    from megacrystal.distributed.runtime import setup_parallel, teardown_parallel
    from megacrystal.engines.megatron import MegatronEngine
    from megacrystal.export.gather import load_weights
    from megacrystal.model.names import global_named_parameters

    config = config_from_dict(config_dict)
    layout = setup_parallel(config)
    try:
        engine = MegatronEngine(config, layout)
        if use_engine_load:
            engine.load_checkpoint(Path(ckpt) / "engine", optimizer=False)
        else:
            load_weights([c.module for c in engine.model], Path(ckpt) / "engine")
        return {n: p.detach().clone() for c in engine.model for n, p in global_named_parameters(c.module)}
    finally:
        teardown_parallel()


def pipeline(tmp: str, tokenizer: str, tokens_file: str, text_file: str) -> dict:
    """Train at TP=2, score at several layouts, export to HF and CS (both releases), import back at other
    layouts, and compare every gathered state dict with the original (collective on 2 ranks)."""
    from megacrystal.config import config_from_dict
    from megacrystal.export.gather import gather
    from megacrystal.train.loop import train

    t = Path(tmp)
    base = run_config(str(t / "run"), tokenizer, parallel={"tp": 2})
    r0 = train(config_from_dict(base), resume="none")
    a = str(t / "run" / "checkpoints")
    r: dict = {"scores": {}, "first_loss_from_init": r0[0].loss}
    r["scores"]["tp2"] = _score(a, "--tokens-file", tokens_file, "--tp", "2")
    r["scores"]["pp2"] = _score(a, "--tokens-file", tokens_file, "--pp", "2", "--micro-batch-size", "2")
    r["scores"]["dp2_text"] = _score(a, "--text-file", text_file)
    hf, cs19, cs2x = (str(t / n) for n in ("hf", "cs19", "cs2x"))
    r["export_hf"] = cli("export", "hf", "--checkpoint", a, "--out", hf, "--bin", "--max-shard-size", "0.0001")
    r["export_cs19"] = cli("export", "cerebras", "--checkpoint", a, "--out", cs19)
    r["export_cs2x"] = cli("export", "cerebras", "--checkpoint", a, "--out", cs2x, "--cs-release", "2.x")
    b, d, d2 = (str(t / n) for n in ("from_hf", "from_cs19", "from_cs2x"))
    r["import_hf"] = cli("import", "hf", "--hf-dir", hf, "--out", b, "--pp", "2")
    cli("import", "cerebras", "--mdl", f"{cs19}/checkpoint_4.mdl", "--params", f"{cs19}/main/params.yaml",
        "--out", d, "--tp", "2")
    cli("import", "cerebras", "--mdl", f"{cs2x}/checkpoint_4.mdl", "--params", f"{cs2x}/main/params.yaml",
        "--out", d2)
    original = gather(a).weights
    r["diff"] = {name: _max_diff(original, gather(path).weights) for name, path in
                 (("hf", b), ("cs19", d), ("cs2x", d2))}
    r["scores"]["from_hf_pp2"] = _score(b, "--tokens-file", tokens_file, "--pp", "2")
    r["scores"]["from_cs19_tp2"] = _score(d, "--tokens-file", tokens_file, "--tp", "2")
    # The trainer's weights-only load of an imported checkpoint, at TP=1 x PP=2, equals the original's weights.
    at_pp2 = {**base, "parallel": {"pp": 2}}
    imported = _engine_weights(at_pp2, f"{b}/step_000000000", use_engine_load=True)
    trained = _engine_weights(at_pp2, f"{a}/step_000000004", use_engine_load=False)
    r["engine_load_diff"] = _max_diff(imported, trained)
    # `train --resume <imported root>` starts a fresh run (step 0, fresh optimizer) from the imported weights.
    continued = train(config_from_dict(run_config(str(t / "continued"), tokenizer)), resume=b)
    r["continued_losses"] = [x.loss for x in continued]
    # DeepSpeed checkpoints: ZeRO-1 over 2 data-parallel ranks (zero_to_fp32) and ZeRO-0 at TP=2 (TP shards
    # merged here). Trained from the same init on the same batches, they hold the megatron run's weights.
    r["deepspeed"] = {}
    for name, extra in (("zero1_dp2", {"deepspeed": {"zero_stage": 1}}),
                        ("zero0_tp2", {"deepspeed": {"zero_stage": 0}, "parallel": {"tp": 2}})):
        run_dir = str(t / f"ds_{name}")
        train(config_from_dict({**run_config(run_dir, tokenizer), "engine": "deepspeed", **extra}), resume="none")
        g = gather(f"{run_dir}/checkpoints")
        r["deepspeed"][name] = {"diff": _max_diff(original, g.weights), "source": g.source,
                                "score": _score(f"{run_dir}/checkpoints", "--tokens-file", tokens_file)}
    # bf16 runs: the export carries the optimizer's fp32 master weights, whose bf16 rounding is the model copy.
    r["bf16"] = {}
    for name, parallel in (("distopt_dp2", {"distributed_optimizer": True}), ("tp2", {"tp": 2})):
        run_dir = str(t / f"bf16_{name}")
        cfg = run_config(run_dir, tokenizer, parallel=parallel)
        cfg["train"] = {**cfg["train"], "precision": "bf16"}
        train(config_from_dict(cfg), resume="none")
        g = gather(f"{run_dir}/checkpoints")
        model = _engine_weights({**cfg, "parallel": {}}, f"{run_dir}/checkpoints/step_000000004", True)
        r["bf16"][name] = {
            "source": g.source,
            "dtypes": sorted({str(w.dtype) for w in g.weights.values()}),
            "rounds_to_model": all(torch.equal(g.weights[n].bfloat16(), model[n]) for n in model),
            "finer_than_bf16": sum(int((w != w.bfloat16().float()).sum()) for w in g.weights.values()),
        }
    r["weights_numel"] = sum(v.numel() for v in original.values())
    r["original"] = {k: v.clone() for k, v in original.items()} if torch.distributed.get_rank() == 0 else None
    return r
