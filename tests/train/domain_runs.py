"""Forward passes with a saved checkpoint's weights, run on a real (one-rank) process group by the domain tests."""
from __future__ import annotations

import torch


def group_losses(checkpoint: str, groups: dict[str, list[list[int]]]) -> dict[str, tuple[float, int]]:
    """{group: (summed NLL in nats, scored tokens)} of [S+1]-token rows, each row scored on tokens 1..S."""
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
