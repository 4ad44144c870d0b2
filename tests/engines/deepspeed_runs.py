"""Train the tiny Crystal with either engine under several configurations in one process group.

Spawned by tests/engines/test_deepspeed.py on 1 or 2 ranks; every configuration runs one after another in
the same processes (process groups are few, imports are paid once).
"""
from __future__ import annotations

import copy
import tempfile
import time

from megacrystal.config import config_from_dict
from megacrystal.data.batches import rank_microbatches
from megacrystal.distributed.runtime import setup_parallel, teardown_parallel
from megacrystal.schedule.from_config import plan_for
from megacrystal.train.loop import build_engine, open_data, train

from .parallel_runs import TINY


def with_overrides(overrides: dict, base: dict = TINY) -> dict:
    """`base` with dotted overrides of any depth ("engine", "deepspeed.zero_stage", "parallel.tp")."""
    merged = copy.deepcopy(base)
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return merged


def losses_per_config(configs: dict[str, dict]) -> dict[str, dict]:
    """name -> {loss, grad_norm, skipped, seconds} per step, for each config (dotted overrides of TINY)."""
    results = {}
    for name, overrides in configs.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            records = train(config_from_dict(with_overrides({**overrides, "run.dir": run_dir})))
        results[name] = {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records],
                         "skipped": [r.skipped for r in records], "seconds": time.perf_counter() - start}
    return results


def losses_with_reset(configs: dict[str, dict], reset_before: int | None) -> dict[str, list[float]]:
    """name -> losses of TINY's steps driven by hand, with engine.reset_optimizer() before step `reset_before`.

    As the trainer does at a weights-only phase start; TINY has a constant LR, so the reset shows.
    """
    results = {}
    for name, overrides in configs.items():
        config = config_from_dict(with_overrides(overrides))
        plan = plan_for(config)
        source, _ = open_data(config, plan)
        layout = setup_parallel(config)
        try:
            engine, losses = build_engine(config, layout), []
            for step in range(plan.total_steps):
                if step == reset_before:
                    engine.reset_optimizer()
                batch = source.global_batch(step)
                microbatches = rank_microbatches(batch.tokens, layout.dp_rank, layout.dp,
                                                 config.train.micro_batch_size, batch.loss_mask)
                losses.append(engine.train_step(microbatches, plan.lr_at_step(step)).loss)
        finally:
            teardown_parallel()
        results[name] = losses
    return results


def suite(configs: dict[str, dict], reset_configs: dict[str, dict] | None = None, reset_before: int = 2) -> dict:
    """Everything one spawn runs: trainer losses per config, and (optionally) the reset curves."""
    start = time.perf_counter()
    results = {"runs": losses_per_config(configs)}
    if reset_configs:
        results["reset"] = losses_with_reset(reset_configs, reset_before)
        deepspeed_only = {name: c for name, c in reset_configs.items() if c.get("engine") == "deepspeed"}
        results["no_reset"] = losses_with_reset(deepspeed_only, None)
    results["seconds"] = time.perf_counter() - start
    return results
