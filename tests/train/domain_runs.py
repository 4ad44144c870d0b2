"""Forward passes with a saved checkpoint's weights, run on a real (one-rank) process group by the domain tests."""
from __future__ import annotations

import torch


def group_losses(jobs: dict[str, tuple[str, dict[str, list[list[int]]]]]) -> dict[str, dict[str, tuple[float, int]]]:
    """job -> {group: (summed NLL in nats, scored tokens)} of [S+1]-token rows under the job's checkpoint, each row
    scored on its tokens 1..S; jobs are {name: (checkpoint, {group: rows})}, run one after another."""
    return {name: _group_losses(checkpoint, groups) for name, (checkpoint, groups) in jobs.items()}


def _group_losses(checkpoint: str, groups: dict[str, list[list[int]]]) -> dict[str, tuple[float, int]]:
    from megacrystal.data.batches import rank_microbatches
    from megacrystal.distributed.runtime import setup_parallel, teardown_parallel
    from megacrystal.engines.megatron import MegatronEngine
    from megacrystal.export.gather import ENGINE_DIR, checkpoint_config, layout_config, load_weights
    from pathlib import Path

    ckpt = Path(checkpoint)
    run = layout_config(checkpoint_config(ckpt), 1, 1, 1, "fp32")
    layout = setup_parallel(run)
    try:
        engine = MegatronEngine(run, layout)
        load_weights([chunk.module for chunk in engine.model], ckpt / ENGINE_DIR)
        out = {}
        for name, rows in groups.items():
            tokens = torch.tensor(rows, dtype=torch.int64)
            out[name] = engine.eval_loss(rank_microbatches(tokens, 0, 1, 1))
        return out
    finally:
        teardown_parallel()


def row_losses_per_layout(layouts: dict[str, dict], steps: int = 2) -> dict[str, list]:
    """name -> the engine's [B, 2] row losses of each of `steps` training steps, per layout (parallel.* overrides)."""
    from megacrystal.config import config_from_dict
    from megacrystal.data.batches import rank_microbatches
    from megacrystal.data.source import SyntheticSource
    from megacrystal.distributed.runtime import setup_parallel, teardown_parallel
    from megacrystal.engines.megatron import MegatronEngine
    from megacrystal.schedule.from_config import plan_for
    from tests.engines.parallel_runs import TINY, _with

    out = {}
    for name, overrides in layouts.items():
        config = config_from_dict(_with(overrides, TINY))
        plan = plan_for(config)
        layout = setup_parallel(config)
        try:
            engine = MegatronEngine(config, layout)
            source = SyntheticSource(config.model.vocab_size, config.model.seq_length, plan, config.train.seed)
            rows = []
            for step in range(steps):
                batch = source.global_batch(step)
                mbs = rank_microbatches(batch.tokens, layout.dp_rank, layout.dp, config.train.micro_batch_size,
                                        batch.loss_mask)
                rows.append(engine.train_step(mbs, plan.lr_at_step(step)).row_losses.tolist())
            out[name] = rows
        finally:
            teardown_parallel()
    return out
