"""Save a checkpoint under one parallel layout and evaluate it under others (run in spawned ranks)."""
from __future__ import annotations

from megacrystal.config import config_from_dict
from megacrystal.data.batches import rank_microbatches
from megacrystal.data.synthetic import SyntheticTokens
from megacrystal.distributed.runtime import setup_parallel, teardown_parallel
from megacrystal.train.loop import build_engine, train

BASE = {
    "model": {"num_layers": 4, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96, "vocab_size": 128,
              "seq_length": 32},
    "optim": {"lr": 0.01},
    "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "threads": 1},
}


def _config(run_dir: str, parallel: dict):
    return config_from_dict({**BASE, "run": {"dir": run_dir}, "parallel": parallel})


def eval_loss_after_load(run_dir: str, parallel: dict, checkpoint: str, optimizer: bool = True) -> tuple[float, float]:
    """Mean token loss of a held-out batch after loading `checkpoint` at layout `parallel`, and again after one
    more training step (which depends on the restored optimizer state too)."""
    config = _config(run_dir, parallel)
    layout = setup_parallel(config)
    try:
        engine = build_engine(config, layout)
        engine.load_checkpoint(checkpoint, optimizer=optimizer)
        held_out = rank_microbatches(SyntheticTokens(128, 32, seed=99).global_batch(0, 8), layout.dp_rank, layout.dp, 2)
        loss_sum, count = engine.eval_loss(held_out)
        batch = rank_microbatches(SyntheticTokens(128, 32, seed=5).global_batch(4, 8), layout.dp_rank, layout.dp, 2)
        engine.train_step(batch, lr=0.01)
        after_sum, after_count = engine.eval_loss(held_out)
        return loss_sum / count, after_sum / after_count
    finally:
        teardown_parallel()


def save_then_evaluate(run_dir: str, saved_at: dict, layouts: dict[str, dict]) -> dict[str, float]:
    """Train 4 steps at `saved_at` (saving at the end), then evaluate the checkpoint under each layout."""
    train(_config(run_dir, saved_at))
    checkpoint = f"{run_dir}/checkpoints/step_000000004/engine"
    results = {"saved": eval_loss_after_load(run_dir, saved_at, checkpoint)}
    for name, parallel in layouts.items():
        results[name] = eval_loss_after_load(run_dir, parallel, checkpoint)
    results["weights_only"] = eval_loss_after_load(run_dir, saved_at, checkpoint, optimizer=False)
    return results


def evaluate(run_dir: str, layouts: dict[str, dict]) -> dict[str, float]:
    checkpoint = f"{run_dir}/checkpoints/step_000000004/engine"
    return {name: eval_loss_after_load(run_dir, parallel, checkpoint) for name, parallel in layouts.items()}
