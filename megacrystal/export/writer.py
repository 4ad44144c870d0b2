"""Write weights from outside (HF or Cerebras files) as a megacrystal checkpoint at a TP/PP layout.

The result is an ordinary checkpoint directory (`engine/` through dist_checkpointing, `config.yaml`,
`trainer_state.json`, `manifest.json`), committed atomically by the checkpoint store as `step_000000000` of the
`--out` root. It holds weights only (no optimizer state): `trainer_state.json` says `"weights_only": true` and its
data state is that of a fresh run, so training from it starts at step 0 of the config's first phase.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, CheckpointStore
from ..config import Config, ConfigError, config_from_dict, dump_config, load_config
from . import keys
from .gather import CONFIG_FILE, ENGINE_DIR, TRAINER_STATE, layout_config

# What must agree between imported weights and a --config for the weights to mean the same model.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size")
FORWARD_FIELDS = ("rotary_percent", "scale_qk_dot_by_d", "embeddings_scale", "output_logits_scale", "layernorm_eps")


def check_out_root(out: str | Path) -> Path:
    """The --out root, refusing one that already holds checkpoints (its `latest` would be moved)."""
    root = Path(out).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file; pass a new directory")
    if root.is_dir() and (any(root.glob("step_*")) or (root / "latest").exists()):
        raise ConfigError(f"--out {root} already holds checkpoints; pass a new directory")
    return root


def import_config(model: dict, where: str, config_path: str | None = None, overrides=()) -> Config:
    """The run config of an import: --config (whose model must match the weights) or one made from `model`."""
    if config_path is None:
        return config_from_dict({"run": {"name": "imported"}, "model": model, "optim": {"lr": 1e-4},
                                 "train": {"steps": 1, "global_batch_size": 1}})
    config = load_config(config_path, overrides)
    if config.engine != "megatron":
        raise ConfigError(f"engine: {config.engine} in {config_path}; imports write megatron-engine checkpoints, so "
                          f"pass a config with engine: megatron")
    for field in SHAPE_FIELDS + FORWARD_FIELDS:
        mine, theirs = getattr(config.model, field), model[field]
        same = math.isclose(mine, theirs, rel_tol=1e-9) if isinstance(mine, float) else mine == theirs
        if not same:
            raise ConfigError(f"model.{field}: {mine!r} in {config_path}, but {theirs!r} in {where}; "
                              f"pass a config of this model")
    return config


def stored_config(config: Config, tp: int, pp: int) -> Config:
    """`config` at layout tp x pp (sequence parallelism and virtual stages dropped where they cannot apply)."""
    raw = config.model_dump(mode="json")
    raw["parallel"].update(tp=tp, pp=pp)
    if tp == 1:
        raw["parallel"]["sp"] = False
    if pp == 1:
        raw["parallel"]["vpp"] = None
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"--tp {tp} --pp {pp}: {err}") from None


def fresh_data_state(config: Config) -> dict:
    """The data-source state of a run that has not drawn a batch (every dataset at its first epoch)."""
    from ..schedule.from_config import plan_for

    plan = plan_for(config)
    if config.data.source == "synthetic":
        from ..data.source import SyntheticSource

        return SyntheticSource(config.model.vocab_size, config.model.seq_length, plan, config.train.seed).state_dict()
    from ..data.blend import BlendedSampler

    state = BlendedSampler({name: 1 for name in plan.datasets}, plan, config.train.seed).state_dict()
    state["datasets"] = {}  # as for datasets new to a run: each starts at its first epoch
    return state


def check_world(tp: int, pp: int) -> int:
    """The launched world size, which must be a multiple of tp x pp."""
    from ..distributed.runtime import world_size_from_env

    world = world_size_from_env()
    if world % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} needs a multiple of {tp * pp} processes but {world} were "
                          f"launched; run it under `torchrun --nproc_per_node {tp * pp} -m megacrystal ...`")
    return world


def write_checkpoint(out: Path, config: Config, get: keys.Getter, tp: int, pp: int, source: dict) -> Path:
    """Build the model at tp x pp on every rank, fill it from global tensors, and commit a checkpoint (collective)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from ..distributed.runtime import setup_parallel, teardown_parallel
    from ..model.crystal import build_model_chunks
    from ..schedule.from_config import plan_for
    from ..train.checkpointing import checkpoint_identity
    from .gather import load_global_into

    world = check_world(tp, pp)
    stored = stored_config(config, tp, pp)
    build = layout_config(stored, tp, pp, world, precision=stored.train.precision)
    first_phase = plan_for(stored).phases[0].name
    resolved = dump_config(stored)
    digest = hashlib.sha256(resolved.encode()).hexdigest()
    state = {"step": 0, "tokens": 0, "phase": first_phase, "consumed_tokens": {}, "config_sha256": digest,
             "data": fresh_data_state(stored), "weights_only": True, "imported_from": source}
    metadata = {**checkpoint_identity(stored), "tokens": 0, "phase": first_phase, "config_sha256": digest,
                "imported_from": source}
    layout = setup_parallel(build)
    try:
        chunks = [c.to(layout.device) for c in build_model_chunks(build.model, build.parallel, build.train.precision)]
        load_global_into(chunks, get, build.model)
        store = CheckpointStore(out, keep=None, recover=layout.is_main)
        where, outcome = [None], [None, None]
        if layout.is_main:
            tmp = store.begin(0)
            (tmp / ENGINE_DIR).mkdir()
            where = [str(tmp)]
        dist.broadcast_object_list(where, src=0)
        tmp = Path(where[0])
        failed = None
        try:
            dist_checkpointing.save({"model": {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}},
                                    str(tmp / ENGINE_DIR))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is a BaseException
            failed = err
        flag = torch.tensor([0.0 if failed is None else 1.0], device=layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if layout.is_main:
            try:
                if flag.item() > 0:
                    raise CheckpointError(f"writing the weights into {out} failed"
                                          + (f": {type(failed).__name__}: {failed}" if failed else " on another rank"))
                (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
                (tmp / CONFIG_FILE).write_text(resolved)
                outcome = [str(store.commit(tmp, 0, metadata)), None]
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                if tmp.exists():
                    store.abort(tmp)
                outcome = [None, str(err) if isinstance(err, CheckpointError) else
                           f"writing the checkpoint into {out} failed: {type(err).__name__}: {err}"]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[1]:
            raise CheckpointError(outcome[1])
        return Path(outcome[0])
    finally:
        teardown_parallel()


class TensorSource:
    """Lazily read named tensors, checking each one's shape on the way (one-line errors name the file)."""

    def __init__(self, where: str, reader, shape_of, dtype=torch.float32):
        self.where, self.reader, self.shape_of, self.dtype = where, reader, shape_of, dtype

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.reader(name)
        want = self.shape_of(name)
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(f"{self.where}: {name} has shape {tuple(tensor.shape)}, {tuple(want)} expected "
                                  f"from its config; the weights belong to another model")
        return tensor.to(self.dtype)
