"""Cerebras Model Zoo: params.yaml per phase (GPT-3, release 1.9 or 2.x layout), the `.mdl` checkpoint, and import.

Release 1.9 is what trained Crystal (crystal-spec §1.1, §3): its `model:` block, muP as embeddings_scale /
output_logits_scale / scale_qk_dot_by_d plus `optimizer.adjust_learning_rate.decoder_kernel`, and "Linear" LR
segments. Release 2.x (2.3+, §4.1) uses the `trainer:` layout and muP base dimensions (mup_base_hidden_size,
mup_base_filter_size, output_logits_alpha) with initializers at the base width. The `.mdl` is the plain torch
pickle `{"model": state_dict}` with unprefixed CS keys and the `ln_f.*` / `lm_head.weight` aliases, which 1.9
(no state_version) and 2.x both load (§4.3).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError
from ..config.data import CORPUS_PREFIX
from ..schedule.lr import LRSegment, lr_at
from . import keys

RELEASES = {"1.9": "1.9", "1.9.1": "1.9", "2.x": "2.x", "2": "2.x"}
DATA_PROCESSOR = "GptHDF5MapDataProcessor"


def release(name: str) -> str:
    """The layout ('1.9' or '2.x') of a --cs-release value."""
    if name not in RELEASES:
        raise ConfigError(f"--cs-release {name!r}: unknown Cerebras release; choose 1.9 (Model Zoo 1.9.x, which "
                          f"trained Crystal) or 2.x (Model Zoo 2.3 and later, trainer layout)")
    return RELEASES[name]


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _init(std: float, truncation: float) -> dict:
    return {"a": -truncation * std, "b": truncation * std, "mean": 0.0, "name": "truncated_normal", "std": std}


# -- model blocks ------------------------------------------------------------------------------------------------
def model_19(config: Config) -> dict:
    """The 1.9 `model:` block (the keys and order of Crystal's yaml, crystal-spec §1.1)."""
    from .hf import check_exportable

    m, i = config.model, config.model.init
    check_exportable(m, "Cerebras Model Zoo")
    bf16 = config.train.precision == "bf16"
    return {
        "attention_dropout_rate": 0.0, "attention_kernel": "optimized_beta", "attention_softmax_fp32": True,
        "attention_type": "scaled_dot_product", "boundary_casting": False, "dropout_rate": 0.0,
        "embedding_initializer": _init(i.embedding_std, i.truncation), "embeddings_scale": m.embeddings_scale,
        "filter_size": m.ffn_hidden_size, "hidden_size": m.hidden_size,
        "initializer": _init(i.hidden_std, i.truncation), "layer_norm_epsilon": m.layernorm_eps,
        # CS loss = sum(CE * mask) / batch_size * loss_weight: the per-token mean of full sequences, as ours.
        "loss_scaling": "batch_size", "loss_weight": 1.0 / m.seq_length,
        "max_position_embeddings": m.seq_length, "mixed_precision": bf16, "nonlinearity": "swiglu",
        "num_heads": m.num_heads, "num_hidden_layers": m.num_layers,
        "output_layer_initializer": _init(i.output_std, i.truncation), "output_logits_scale": m.output_logits_scale,
        "position_embedding_type": "rotary", "rotary_dim": m.rotary_dim, "scale_glu_initialization": True,
        "scale_qk_dot_by_d": m.scale_qk_dot_by_d, "share_embedding_weights": True, "use_bfloat16": bf16,
        "use_bias_in_output": False, "use_ffn_bias": True, "use_ffn_bias_in_attention": True,
        "use_position_embedding": True, "use_projection_bias_in_attention": True, "vocab_size": m.vocab_size,
        "weight_initialization_seed": config.train.seed,
    }


def model_2x(config: Config) -> dict:
    """The 2.x model block: muP as base dimensions, initializers at the base width (crystal-spec §4.1)."""
    from .hf import check_exportable

    m, i = config.model, config.model.init
    check_exportable(m, "Cerebras Model Zoo")
    width = 1.0 / m.mup_width_scale  # the 2.2 -> 2.3 converter's width_mult = 1 / decoder_kernel
    return {
        "name": "gpt3", "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "position_embedding_type": "rotary", "rotary_dim": m.rotary_dim, "share_embedding_weights": True,
        "max_position_embeddings": m.seq_length, "num_hidden_layers": m.num_layers, "dropout_rate": 0.0,
        "norm_type": "layernorm", "layer_norm_epsilon": m.layernorm_eps, "num_heads": m.num_heads,
        "attention_type": "scaled_dot_product", "attention_dropout_rate": 0.0, "attention_softmax_fp32": True,
        "use_projection_bias_in_attention": True, "use_ffn_bias_in_attention": True,
        "filter_size": m.ffn_hidden_size, "nonlinearity": "swiglu", "use_ffn_bias": True, "use_bias_in_output": False,
        "loss_scaling": "batch_size", "loss_weight": 1.0 / m.seq_length,
        "embedding_initializer": _init(i.embedding_std, i.truncation),
        "initializer": _init(i.hidden_std * math.sqrt(width), i.truncation),
        "output_layer_initializer": _init(i.output_std * math.sqrt(2 * width * m.num_layers), i.truncation),
        "mup_base_hidden_size": _num(m.hidden_size / width), "mup_base_filter_size": _num(m.ffn_hidden_size / width),
        "output_logits_alpha": m.output_logits_scale * width, "scale_output_logits_by_d": True,
        "embeddings_scale": m.embeddings_scale, "scale_qk_dot_by_d": m.scale_qk_dot_by_d,
    }


# -- LR schedule -------------------------------------------------------------------------------------------------
def lr_pieces(seg: LRSegment, phase_steps: int, offset: int = 0) -> list[tuple[str, float, float, int]]:
    """A phase's LR from step `offset` on as (kind, initial, end, steps) pieces, kind linear|cosine|constant.

    Same convention as schedule/lr.py and Cerebras' schedulers: a piece's LR at its step t is
    initial + (end - initial) * t / steps, and the next piece starts where it ends.
    """
    if seg.style == "1-sqrt" or seg.decay_fraction is not None:  # no such pieces in the 1.9 / 2.x schedulers
        raise ConfigError("a WSD (lr.decay_fraction) or 1-sqrt LR has no Cerebras export yet; export a config "
                          "whose phases use linear or cosine decay without decay_fraction")
    warmup, decay = seg.warmup_steps, seg.decay_length(phase_steps)
    pieces = []
    if offset < warmup:
        pieces.append(("linear", lr_at(seg, offset, phase_steps), seg.peak, warmup - offset))
    start = max(offset, warmup)
    if decay > 0 and start < warmup + decay:
        if seg.style == "cosine" and start > warmup:
            raise ConfigError(f"a cosine LR decay cannot be continued mid-way on Cerebras (step {offset} of the "
                              f"phase); export a checkpoint from a phase boundary")
        kind = "linear" if seg.style == "linear" else "cosine"
        pieces.append((kind, lr_at(seg, start, phase_steps), seg.end, warmup + decay - start))
    if warmup + decay < phase_steps:
        rest = phase_steps - max(offset, warmup + decay)
        pieces.append(("constant", seg.end, seg.end, rest))
    return pieces


def lr_19(pieces) -> list[dict]:
    """1.9 `optimizer.learning_rate`: each piece with the keys Model Zoo 1.9 reads for it, once
    (`PyTorchBaseModel._configure_lr_scheduler`: Linear needs initial/end_learning_rate and steps, CosineDecay
    decay_steps, Constant learning_rate and steps)."""
    out = []
    for kind, a, b, n in pieces:
        if kind == "linear":
            out.append({"scheduler": "Linear", "initial_learning_rate": a, "end_learning_rate": b, "steps": n})
        elif kind == "cosine":
            out.append({"scheduler": "CosineDecay", "initial_learning_rate": a, "end_learning_rate": b,
                        "decay_steps": n})
        else:
            out.append({"scheduler": "Constant", "learning_rate": a, "steps": n})
    return out


def lr_2x(pieces) -> list[dict]:
    """2.x `trainer.init.schedulers`."""
    out = []
    for kind, a, b, n in pieces:
        if kind == "constant":
            out.append({"ConstantLR": {"learning_rate": a, "total_iters": n}})
        else:
            name = "LinearLR" if kind == "linear" else "CosineDecayLR"
            out.append({name: {"initial_learning_rate": a, "end_learning_rate": b, "total_iters": n}})
    return [{"SequentialLR": {"schedulers": out}}]


# -- data --------------------------------------------------------------------------------------------------------
def data_dir_of(config: Config, dataset: str, overrides: dict[str, str]) -> str | list[str]:
    """Where Model Zoo should read a dataset: --data-dir NAME=PATH, else the dataset's inputs (a `corpus:`
    input: the prepared dataset), else a placeholder (the synthetic stream has no files)."""
    if dataset in overrides:
        return overrides[dataset]
    ds = config.data.datasets.get(dataset)
    if ds is None:
        return f"/path/to/hdf5/{dataset}"
    data_root = config.data.dir.format(name=config.run.name)
    dirs = [f"{data_root}/{dataset}" if i.startswith(CORPUS_PREFIX) else i for i in ds.inputs]
    dirs = list(dict.fromkeys(dirs))
    return dirs[0] if len(dirs) == 1 else dirs


def mixture(config: Config, weights: dict[str, float], overrides: dict[str, str]) -> list[dict]:
    """`train_input.mixture` of a phase: its blend weights as configured, in order."""
    return [{"data_dir": data_dir_of(config, name, overrides), "weight": w} for name, w in weights.items()]


def phase_weights(config: Config, plan) -> list[dict[str, float]]:
    """The blend weights of each phase exactly as written in the config (the plan normalizes them)."""
    if config.data.phases:
        return [dict(p.weights) for p in config.data.phases.values()]
    return [dict(p.weights) for p in plan.phases]


# -- params.yaml -------------------------------------------------------------------------------------------------
def params_yaml(config: Config, index: int, layout: str, *, offset: int = 0, pretrained: bool | None = None,
                data_dirs: dict[str, str] | None = None, model_dir: str = "model_dir",
                checkpoint_path: str | None = None, num_csx: int = 1, global_start: int = 0) -> dict:
    """params.yaml of phase `index` of the run (from step `offset` of the phase) for Model Zoo `layout`.

    `global_start` is Model Zoo's global step when this run starts: the step restored from `checkpoint_path`
    (0 for a weights-only start, `is_pretrained_checkpoint`). Model Zoo trains until the global step reaches
    `max_steps` (runner `_configure_run_steps`: total = min(num_steps, max_steps - global_step)) and restores the
    LR scheduler's step with the optimizer, so a continuing phase gets the cumulative `max_steps`, its own
    `num_steps`, and its LR pieces after a constant piece over the steps already taken.
    """
    from ..schedule.from_config import plan_for

    plan = plan_for(config)
    phase, steps = plan.phases[index], plan.steps[index]
    if phase.mixing is not None:
        raise ConfigError(f"data.phases.{phase.name}.mixing: Model Zoo's data mixture is fixed, so a phase with online "
                          "mixing has no Cerebras export; set mixing.mode: static (its initial weights) to export it")
    pieces = lr_pieces(phase.lr, steps, offset)
    if global_start:
        pieces = [("constant", pieces[0][1], pieces[0][1], global_start), *pieces]
    weights = phase_weights(config, plan)[index]
    mix = mixture(config, weights, data_dirs or {})
    o, t = config.optim, config.train
    if pretrained is None:
        pretrained = phase.weights_only_start
    num_steps = steps - offset
    max_steps = global_start + num_steps
    ckpt_steps = min(config.checkpoint.interval or num_steps, num_steps)
    if layout == "1.9":
        optimizer = {"optimizer_type": "AdamW", "beta1": o.betas[0], "beta2": o.betas[1], "eps": o.eps,
                     "weight_decay_rate": o.weight_decay}
        if o.clip_grad:
            optimizer["max_gradient_norm"] = o.clip_grad
        optimizer.update({"correct_bias": True, "loss_scaling_factor": 1.0, "log_summaries": True,
                          "learning_rate": lr_19(pieces),
                          "adjust_learning_rate": {"decoder_kernel": config.model.mup_width_scale}})
        runconfig = {"max_steps": max_steps, "num_steps": num_steps, "checkpoint_steps": ckpt_steps, "log_steps": 1,
                     "save_initial_checkpoint": False, "seed": t.seed, "use_cs_grad_accum": True,
                     "enable_distributed": False, "use_appliance_data": True,
                     "is_pretrained_checkpoint": bool(pretrained)}
        if checkpoint_path:
            runconfig["checkpoint_path"] = checkpoint_path
        return {
            "train_input": {"batch_size": t.global_batch_size, "data_processor": DATA_PROCESSOR, "mixture": mix,
                            "num_workers": 1, "persistent_workers": True, "prefetch_factor": 10, "repeat": True,
                            "shuffle": False, "shuffle_seed": t.seed, "use_worker_cache": False,
                            "vocab_size": config.model.vocab_size},
            "model": model_19(config),
            "optimizer": optimizer,
            "runconfig": runconfig,
        }
    bf16 = t.precision == "bf16"
    precision = {"enabled": bf16, "loss_scaling_factor": 1.0}
    if bf16:
        precision["fp16_type"] = "bfloat16"
    if o.clip_grad:
        precision["max_gradient_norm"] = o.clip_grad
    init = {
        "backend": {"backend_type": "CSX", "cluster_config": {"num_csx": num_csx}},
        "model_dir": model_dir, "seed": t.seed,
        "model": model_2x(config),
        "optimizer": {"AdamW": {"betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                                "correct_bias": True}},
        "schedulers": lr_2x(pieces),
        "precision": precision,
        "loop": {"num_steps": num_steps, "max_steps": max_steps},
        "checkpoint": {"steps": ckpt_steps, "save_initial_checkpoint": False},
        "logging": {"log_steps": 1},
    }
    fit = {"train_dataloader": {"data_processor": DATA_PROCESSOR, "mixture": mix, "batch_size": t.global_batch_size,
                                "shuffle": False, "shuffle_seed": t.seed, "num_workers": 1, "prefetch_factor": 10,
                                "persistent_workers": True}}
    if checkpoint_path:
        fit["ckpt_path"] = checkpoint_path
    return {"trainer": {"init": init, "fit": fit}}


def cs_state_dict(weights: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """The CS state dict (unprefixed, aliases sharing their tensor) of global fp32 weights."""
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        return weights[name]

    out = {}
    for name in keys.cs_names(m.num_layers):
        target = keys.CS_ALIASES.get(name, name)
        if target not in cache:
            cache[target] = keys.cs_tensor(target, get, m.num_heads).float().contiguous()
        out[name] = cache[target]
    return out


def export_cerebras(config: Config, out: Path, layout: str, *, weights: dict | None = None, step: int = 0,
                    data_dirs: dict[str, str] | None = None, model_dir: str = "model_dir", num_csx: int = 1,
                    modelzoo: str = "/path/to/modelzoo") -> list[str]:
    """Write params.yaml for every phase (and the .mdl of `weights`); return the lines to print."""
    from ..schedule.from_config import plan_for

    plan = plan_for(config)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    mdl = None
    if weights is not None:
        mdl = out / f"checkpoint_{step}.mdl"
        torch.save({"model": cs_state_dict(weights, config.model)}, mdl)
        lines.append(f"wrote {mdl} ({len(keys.cs_names(config.model.num_layers))} CS keys)")
    # The phase the export continues: the one the checkpoint's step falls in (a boundary starts the next).
    start_index, offset = 0, 0
    if weights is not None:
        if step >= plan.total_steps:
            start_index = len(plan.phases)
        else:
            start_index, _, offset = plan.phase_at_step(step)
    commands, previous_ckpt, previous_end = [], None, 0
    for index, (phase, steps) in enumerate(zip(plan.phases, plan.steps)):
        run_dir = f"{model_dir}/{phase.name}"
        continues = mdl is not None and index == start_index
        ckpt = str(mdl) if continues else (previous_ckpt if index > start_index else None)
        pretrained = True if continues else None  # no CS optimizer state in the export: weights only
        weights_only = continues or phase.weights_only_start or ckpt is None
        # The global step this phase starts at on the CS-2: 0 from scratch or weights only, else where the
        # previous phase's run ended (restored from its checkpoint).
        start = 0 if weights_only else previous_end
        params = params_yaml(config, index, layout, pretrained=pretrained, data_dirs=data_dirs, model_dir=run_dir,
                             checkpoint_path=ckpt, num_csx=num_csx, global_start=start)
        path = out / phase.name / "params.yaml"
        _write_yaml(path, params)
        lines.append(f"wrote {path} (phase {phase.name}: {steps:,} steps, global steps {start:,} to "
                     f"{start + steps:,}{', from ' + ckpt if ckpt else ''})")
        run_steps = steps
        if continues and offset:
            run_steps = steps - offset
            params = params_yaml(config, index, layout, offset=offset, pretrained=True, data_dirs=data_dirs,
                                 model_dir=run_dir, checkpoint_path=str(mdl), num_csx=num_csx)
            path = out / f"{phase.name}-resume" / "params.yaml"
            _write_yaml(path, params)
            lines.append(f"wrote {path} (the remaining {run_steps:,} steps of phase {phase.name})")
        if index >= start_index:
            commands.append(_command(layout, path, ckpt, run_dir, num_csx, modelzoo, out))
            previous_end = start + run_steps
            previous_ckpt = f"{run_dir}/checkpoint_{previous_end}.mdl"  # the CS runner's name: its global step
        else:
            previous_end = start + steps
    if weights is not None and start_index >= len(plan.phases):
        lines.append("the checkpoint ends the run's last phase: use the .mdl to evaluate or fine-tune "
                     "(runconfig.is_pretrained_checkpoint: true)")
    unmapped = sorted({name for w in phase_weights(config, plan) for name in w} - set(data_dirs or {}))
    if unmapped:
        lines.append(f"note: the mixtures read {', '.join(unmapped)} from this config's inputs; Model Zoo reads "
                     f"HDF5 datasets (its create_hdf5_dataset.py): point each one there with --data-dir NAME=PATH")
    if commands:
        lines.append("on the CS-2 cluster, run" + (" in order:" if len(commands) > 1 else ":"))
        lines += commands
    return lines


def _write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def _command(layout: str, params: Path, ckpt: str | None, model_dir: str, num_csx: int, modelzoo: str,
             out: Path) -> str:
    if layout == "2.x":  # 2.x keeps model_dir and the checkpoint in the params file
        return f"  cszoo fit {params}"
    cmd = (f"  python {modelzoo}/modelzoo/transformers/pytorch/gpt3/run.py CSX --mode train --num_csx {num_csx} "
           f"--num_workers_per_csx 1 --params {params} --python_paths {modelzoo} --mount_dirs {modelzoo} {out} "
           f"--model_dir {model_dir}")
    return cmd + (f" --checkpoint_path {ckpt}" if ckpt else "")


# -- import ------------------------------------------------------------------------------------------------------
def model_from_params(params: dict, where: str) -> dict:
    """The `model:` section of a run config for a Model Zoo GPT-3 params.yaml (1.9 or 2.x layout)."""
    if isinstance(params.get("trainer"), dict):
        model, layout = params["trainer"].get("init", {}).get("model"), "2.x"
    else:
        model, layout = params.get("model"), "1.9"
    if not isinstance(model, dict) or "hidden_size" not in model:
        raise ConfigError(f"{where} is not a Model Zoo GPT-3 params.yaml (no model section)")
    for key, want in (("nonlinearity", "swiglu"), ("position_embedding_type", "rotary"),
                      ("share_embedding_weights", True), ("use_bias_in_output", False)):
        if model.get(key, want) != want:
            raise ConfigError(f"{where}: model.{key} is {model[key]!r}; Crystal has {want!r}")
    hidden, heads, filt, layers = (model.get(k) for k in ("hidden_size", "num_heads", "filter_size",
                                                           "num_hidden_layers"))
    head_dim = hidden // heads
    std = {k: model.get(k, {}).get("std") for k in ("embedding_initializer", "initializer",
                                                    "output_layer_initializer")}
    if layout == "1.9":
        width_scale = params.get("optimizer", {}).get("adjust_learning_rate", {}).get("decoder_kernel", 1.0)
        logits = model.get("output_logits_scale", 1.0)
        hidden_std, output_std = std["initializer"], std["output_layer_initializer"]
    else:
        width_scale = model.get("mup_base_hidden_size", hidden) / hidden
        width = 1.0 / width_scale
        logits = model.get("output_logits_alpha", 1.0) * (width_scale if model.get("scale_output_logits_by_d",
                                                                                   True) else 1.0)
        hidden_std = std["initializer"] / math.sqrt(width) if std["initializer"] else None
        output_std = std["output_layer_initializer"] / math.sqrt(2 * width * layers) \
            if std["output_layer_initializer"] else None
    init = {k: v for k, v in (("embedding_std", std["embedding_initializer"]), ("hidden_std", hidden_std),
                              ("output_std", output_std)) if v}
    return {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "ffn_hidden_size": filt,
            "vocab_size": model.get("vocab_size"), "seq_length": model.get("max_position_embeddings"),
            "layernorm_eps": model.get("layer_norm_epsilon", 1e-5),
            "rotary_percent": model.get("rotary_dim", head_dim) / head_dim,
            "scale_qk_dot_by_d": bool(model.get("scale_qk_dot_by_d", False)),
            "embeddings_scale": model.get("embeddings_scale", 1.0), "output_logits_scale": logits,
            "mup_width_scale": width_scale, "init": init}


def read_mdl(path: Path, num_layers: int) -> dict[str, torch.Tensor]:
    """The unprefixed CS model state dict of a `.mdl` torch pickle, strictly checked against Crystal's key set."""
    from .hf import check_keys

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a .mdl checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path} is not a torch-pickle CS checkpoint ({type(err).__name__}); a native H5 "
                              f"checkpoint must first be converted with cerebras.pytorch") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' state dict; it is not a Model Zoo checkpoint")
    sd = obj["model"]
    if "state_version" in obj or (sd and all(k.startswith("model.") for k in sd)):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    names = keys.cs_names(num_layers)
    check_keys(set(sd), names, set(keys.CS_ALIASES), lambda n: False, str(path), "CS Crystal")
    for alias, target in keys.CS_ALIASES.items():
        if alias in sd and not torch.equal(sd[alias], sd[target]):
            raise CheckpointError(f"{path}: {alias} differs from {target}; Crystal ties them")
    return sd


def import_cerebras(mdl: str | Path, params_path: str | Path, out: str | Path, tp: int = 1, pp: int = 1,
                    config_path: str | None = None, overrides=()) -> Path:
    """Write a CS `.mdl` (with its params.yaml) as a megacrystal checkpoint at tp x pp (collective)."""
    from .writer import TensorSource, check_out_root, check_world, import_config, write_checkpoint

    params_file = Path(params_path).expanduser().absolute()
    if not params_file.is_file():
        raise ConfigError(f"--params {params_file}: no such file; pass the Model Zoo params.yaml of the checkpoint")
    try:
        params = yaml.safe_load(params_file.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{params_file} is not valid YAML") from None
    model = model_from_params(params if isinstance(params, dict) else {}, str(params_file))
    config = import_config(model, str(params_file), config_path, overrides)
    root = check_out_root(out)
    check_world(tp, pp)
    m = config.model
    path = Path(mdl).expanduser().absolute()
    sd = read_mdl(path, m.num_layers)
    meta = {n: torch.empty(shape, device="meta") for n, shape in keys.global_shapes(m).items()}
    shapes = {name: tuple(keys.cs_tensor(name, meta.__getitem__, m.num_heads).shape)  # shapes without data
              for name in keys.cs_names(m.num_layers)}
    get = TensorSource(str(path), sd.__getitem__, shapes.__getitem__)
    return write_checkpoint(root, config, lambda name: keys.global_from_cs(name, get, m.num_heads), tp, pp,
                            {"format": "cerebras", "path": str(path), "params": str(params_file)})
