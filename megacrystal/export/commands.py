"""The `export cerebras|hf`, `import hf|cerebras` and `score` subcommands (registered by megacrystal.cli)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config import ConfigError
from ..config.arguments import positive_float, positive_int

_GB = 1 << 30


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _main_rank():
        print(text, flush=True)


def _barrier() -> None:
    """Keep the ranks of a torchrun launch together until rank 0 has written its files."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def _layout(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--tp", type=positive_int, default=1, help=f"tensor-parallel size to {what} at (default 1)")
    parser.add_argument("--pp", type=positive_int, default=1, help=f"pipeline-parallel size to {what} at (default 1); "
                        "launch tp x pp (x dp) processes with torchrun for more than one")


def _import_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="the run config to continue with (its model must match); "
                        "its engine/optimizer settings go into the checkpoint, so `train --resume` accepts it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of --config, e.g. --set data.dir=/data/crystal")


def register(subparsers) -> None:
    """Add `export`, `import` and `score` to the megacrystal command."""
    export = subparsers.add_parser("export", help="export a checkpoint to Cerebras Model Zoo or Hugging Face")
    targets = export.add_subparsers(dest="export_target", required=True)

    cs = targets.add_parser("cerebras", help="params.yaml per phase + a .mdl checkpoint for Model Zoo (CS-2)")
    source = cs.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint (or checkpoint root) to export")
    source.add_argument("--config", help="write only the params.yaml files of this run config (no checkpoint)")
    cs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of --config")
    cs.add_argument("--out", required=True, help="output directory")
    cs.add_argument("--cs-release", default="1.9", help="Model Zoo release: 1.9 (as Crystal) or 2.x (default 1.9)")
    cs.add_argument("--data-dir", action="append", default=[], metavar="DATASET=PATH",
                    help="Model Zoo HDF5 directory of a dataset (default: the dataset's inputs)")
    cs.add_argument("--model-dir", default="model_dir", help="Model Zoo model_dir root; one sub-directory per phase")
    cs.add_argument("--num-csx", type=positive_int, default=1, help="CS-2 systems (Crystal used 16)")
    cs.add_argument("--modelzoo", default="/path/to/modelzoo", help="Model Zoo checkout on the cluster")
    _debug(cs)
    cs.set_defaults(handler=_export_cerebras)

    hf = targets.add_parser("hf", help="a CrystalCoder Hugging Face directory (config.json, weights, tokenizer)")
    hf.add_argument("--checkpoint", required=True, help="checkpoint (or checkpoint root) to export")
    hf.add_argument("--out", required=True, help="output directory")
    hf.add_argument("--bin", action="store_true", help="also write pytorch_model.bin (torch pickle)")
    hf.add_argument("--max-shard-size", type=positive_float, default=5.0, metavar="GB",
                    help="largest weight file before sharding with an index (default 5 GB)")
    hf.add_argument("--tokenizer", default=None, help="SentencePiece .model to ship (default: the run's tokenizer)")
    _debug(hf)
    hf.set_defaults(handler=_export_hf)

    imp = subparsers.add_parser("import", help="write Hugging Face or Cerebras weights as a megacrystal checkpoint")
    sources = imp.add_subparsers(dest="import_source", required=True)
    ihf = sources.add_parser("hf", help="from a CrystalCoder Hugging Face directory (e.g. LLM360's release)")
    ihf.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    ihf.add_argument("--out", required=True, help="new checkpoint root (the checkpoint is its step_000000000)")
    _layout(ihf, "write")
    _import_config(ihf)
    _debug(ihf)
    ihf.set_defaults(handler=_import_hf)
    ics = sources.add_parser("cerebras", help="from a Model Zoo .mdl torch pickle and its params.yaml")
    ics.add_argument("--mdl", required=True, help="the .mdl checkpoint (torch pickle)")
    ics.add_argument("--params", required=True, help="its Model Zoo params.yaml (1.9 or 2.x layout)")
    ics.add_argument("--out", required=True, help="new checkpoint root (the checkpoint is its step_000000000)")
    _layout(ics, "write")
    _import_config(ics)
    _debug(ics)
    ics.set_defaults(handler=_import_cerebras)

    score = subparsers.add_parser("score", help="mean next-token NLL of a text under a checkpoint (JSON)")
    score.add_argument("--checkpoint", required=True, help="checkpoint (or checkpoint root)")
    text = score.add_mutually_exclusive_group(required=True)
    text.add_argument("--text-file", help="UTF-8 text, tokenized with --tokenizer or the run's tokenizer")
    text.add_argument("--tokens-file", help="a JSON file with one list of token ids")
    score.add_argument("--tokenizer", default=None, help="SentencePiece .model (or a directory with tokenizer.model)")
    _layout(score, "score")
    score.add_argument("--micro-batch-size", type=positive_int, default=1, help="windows per forward pass (default 1)")
    score.add_argument("--precision", default="fp32", help="fp32 (default) or bf16")
    _debug(score)
    score.set_defaults(handler=_score)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{flag} {item!r}: expected NAME=PATH")
        out[key] = value
    return out


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")


def _export_cerebras(args) -> int:
    from ..config import load_config
    from .cerebras import export_cerebras, release

    layout = release(args.cs_release)
    data_dirs = _pairs(args.data_dir, "--data-dir")
    _positive(args, "num_csx")
    options = dict(data_dirs=data_dirs, model_dir=args.model_dir, num_csx=args.num_csx, modelzoo=args.modelzoo)
    if args.config:
        config = load_config(args.config, args.overrides)
        lines = export_cerebras(config, Path(args.out), layout, **options)
    else:
        if args.overrides:
            raise ConfigError("--set applies to --config; a checkpoint's config is exported as it was trained")
        from .gather import gather

        gathered = gather(args.checkpoint)
        lines = [f"read {gathered.path} ({gathered.source})"]
        if _main_rank():
            lines += export_cerebras(gathered.config, Path(args.out), layout, weights=gathered.weights,
                                     step=int(gathered.state.get("step", 0)), **options)
    for line in lines:
        _say(line)
    _barrier()
    return 0


def _export_hf(args) -> int:
    from .gather import gather
    from .hf import export_hf
    from .score import tokenizer_model_path

    if args.max_shard_size <= 0:
        raise ConfigError(f"--max-shard-size: must be positive, got {args.max_shard_size}")
    gathered = gather(args.checkpoint)
    tokenizer = tokenizer_model_path(gathered.config, args.tokenizer)
    if not tokenizer.is_file():
        if args.tokenizer is not None:
            raise ConfigError(f"--tokenizer {args.tokenizer}: no SentencePiece model there")
        tokenizer = None
    if _main_rank():
        out = Path(args.out)
        formats = ("safetensors", "bin") if args.bin else ("safetensors",)
        files = export_hf(gathered, out, formats, int(args.max_shard_size * _GB), tokenizer)
        _say(f"read {gathered.path} ({gathered.source})")
        _say(f"wrote {out}: {', '.join(files)}")
        if tokenizer is None:
            _say("no tokenizer shipped: the run has none; pass --tokenizer MODEL to add one")
        _say("to load it with transformers, copy configuration_crystalcoder.py and modeling_crystalcoder.py from "
             "the LLM360/Crystal model repository into it (trust_remote_code=True)")
    _barrier()
    return 0


def _import_hf(args) -> int:
    from .hf import import_hf

    _positive(args, "tp", "pp")
    path = import_hf(args.hf_dir, args.out, args.tp, args.pp, args.config, args.overrides)
    _say(f"wrote {path} (weights only, tp {args.tp} x pp {args.pp}); continue training with "
         f"`megacrystal train --config CONFIG --resume {path}`")
    return 0


def _import_cerebras(args) -> int:
    from .cerebras import import_cerebras

    _positive(args, "tp", "pp")
    path = import_cerebras(args.mdl, args.params, args.out, args.tp, args.pp, args.config, args.overrides)
    _say(f"wrote {path} (weights only, tp {args.tp} x pp {args.pp}); continue training with "
         f"`megacrystal train --config CONFIG --resume {path}`")
    return 0


def _score(args) -> int:
    from .gather import checkpoint_config, resolve_checkpoint
    from .score import encode_text, read_tokens_file, score, tokenizer_model_path

    _positive(args, "tp", "pp", "micro_batch_size")
    if args.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision {args.precision!r}: choose fp32 or bf16")
    if args.tokens_file:
        if args.tokenizer:
            raise ConfigError("--tokenizer applies to --text-file only")
        tokens, where = read_tokens_file(args.tokens_file), f"--tokens-file {args.tokens_file}"
    else:
        config = checkpoint_config(resolve_checkpoint(args.checkpoint))
        tokens = encode_text(args.text_file, tokenizer_model_path(config, args.tokenizer), config.model.vocab_size)
        where = f"--text-file {args.text_file}"
    result = score(args.checkpoint, tokens, args.tp, args.pp, args.micro_batch_size, args.precision, where)
    _say(json.dumps(result))
    return 0
