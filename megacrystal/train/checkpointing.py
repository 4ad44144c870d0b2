"""The trainer's side of checkpoints: what goes in one, when a rank writes it, and resuming from one.

A checkpoint directory holds `engine/` (model and optimizer shards, written by every rank through the engine),
`rng/rank_<r>.pt`, `trainer_state.json` (step, phase, data cursors, consumed tokens) and the store's manifest.
Rank 0 owns the directory: it opens it, commits it atomically after every rank has written, and resolves
`--resume`; the others follow its broadcasts, so every rank takes the same decision.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, CheckpointStore
from ..checkpoint.lock import lock_run_dir
from ..config import Config, dump_config
from ..distributed.runtime import Layout
from .signals import shielded

TRAINER_STATE = "trainer_state.json"


def checkpoint_identity(config: Config) -> dict:
    """What a checkpoint must match to be loaded: the model's shape and the optimizer-state format."""
    m = config.model
    if config.engine == "deepspeed":
        fmt = f"deepspeed-zero{config.deepspeed.zero_stage}"
    else:
        fmt = "megatron-distributed-optimizer" if config.parallel.distributed_optimizer else "megatron"
    return {"model_fingerprint": {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
                                  "num_heads": m.num_heads, "ffn_hidden_size": m.ffn_hidden_size,
                                  "vocab_size": m.vocab_size},
            "optimizer_format": fmt}


class Checkpointer:
    """Saves and restores engine, data and RNG state in the run's CheckpointStore."""

    def __init__(self, config: Config, layout: Layout, engine, source):
        self.config, self.layout, self.engine, self.source = config, layout, engine, source
        self.identity = checkpoint_identity(config)
        self.resolved_config = dump_config(config)  # the config does not change during a run
        self.config_sha256 = hashlib.sha256(self.resolved_config.encode()).hexdigest()
        self.store = CheckpointStore(config.checkpoint_dir(), keep=config.checkpoint.keep, recover=layout.is_main)

    # -- resume ----------------------------------------------------------------------------------------
    def resume(self, spec: str) -> dict | None:
        """Load the checkpoint `spec` names (auto | PATH | none); return its trainer state, or None."""
        decision = [None, None]
        if self.layout.is_main:
            try:
                lock_run_dir(self.config.run_dir())  # before anything is written: one run per run directory
                path = self.store.resolve_resume(spec, expect=self.identity)
                decision = [str(path) if path else None, None]
            except CheckpointError as err:
                decision = [None, str(err)]
        dist.broadcast_object_list(decision, src=0)
        path, error = decision
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
        path = Path(path)
        state = json.loads((path / TRAINER_STATE).read_text())
        # Imported weights (megacrystal import hf|cerebras) carry no optimizer state: start it fresh.
        self.engine.load_checkpoint(path / "engine", optimizer=not state.get("weights_only", False))
        rng = path / "rng" / f"rank_{self.layout.rank}.pt"
        if rng.is_file():  # absent when the world grew; nothing in training draws random numbers yet
            torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
        state["path"] = str(path)
        return state

    # -- save ------------------------------------------------------------------------------------------
    def save(self, state: dict, phase_end: bool) -> Path:
        """Write a checkpoint of the state after `state['step']` steps on every rank; rank 0 commits it.

        Stop signals are held back meanwhile (see signals.py), and no rank returns before every rank knows the
        outcome, so a rank that stops right after cannot cut a peer's save short.
        """
        with shielded():
            path = self._save(state, phase_end)
        return path

    def _save(self, state: dict, phase_end: bool) -> Path:
        step = state["step"]
        state = {**state, "config_sha256": self.config_sha256}
        metadata = {**self.identity, "tokens": state["tokens"], "phase": state["phase"],
                    "config_sha256": state["config_sha256"]}
        outcome = [None, None]
        self._where_sent = False
        if self.layout.is_main:
            try:
                with self.store.saving(step, metadata, phase_end=phase_end) as tmp:
                    (tmp / "engine").mkdir()
                    (tmp / "rng").mkdir()
                    self._write_shards(tmp, state)
                outcome = [str(self.store.step_dir(step)), None]
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is a BaseException
                if not self._where_sent:  # failed before the others were told where to write: tell them not to
                    dist.broadcast_object_list([None], src=0)
                message = str(err) if isinstance(err, CheckpointError) else \
                    f"checkpoint save of step {step} failed: {type(err).__name__}: {err}"
                outcome = [None, self._with_latest(" ".join(message.split()))]
        else:
            try:
                self._write_shards(None, state)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # noqa: BLE001 - every rank failed together; rank 0's outcome says how
                pass
        dist.broadcast_object_list(outcome, src=0)
        if outcome[1]:
            raise CheckpointError(outcome[1])
        dist.barrier()
        return Path(outcome[0])

    def _with_latest(self, message: str) -> str:
        """`message`, naming the newest complete checkpoint unless it already says which one is intact."""
        if "intact" in message or "previous checkpoint" in message:
            return message
        latest = self.store.latest()
        return message + (f"; the latest good checkpoint is {latest}" if latest else
                          "; there is no earlier checkpoint")

    def _write_shards(self, tmp: Path | None, state: dict) -> None:
        where = [str(tmp) if tmp else None]
        dist.broadcast_object_list(where, src=0)
        self._where_sent = True
        if where[0] is None:  # rank 0 could not open the save; its outcome says why
            return
        tmp = Path(where[0])
        failed = None
        try:
            self.engine.save_checkpoint(tmp / "engine")
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank_{self.layout.rank}.pt")
            if self.layout.is_main:
                (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
                (tmp / "config.yaml").write_text(self.resolved_config)  # its sha256 is in the manifest
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - reported below, after all ranks agree
            failed = err
        flag = torch.tensor([0.0 if failed is None else 1.0], device=self.layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if failed is not None:
            raise failed
        if flag.item() > 0:
            raise CheckpointError(f"checkpoint save of step {state['step']} failed on another rank; "
                                  f"see that rank's log")
