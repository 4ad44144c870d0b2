"""The training loop: the phase plan drives batches and LR; engines do the work; metrics come out."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import Config, dump_config
from ..data.batches import rank_microbatches
from ..distributed.runtime import Layout, setup_parallel, teardown_parallel, world_size_from_env
from ..model.size import flops_per_token
from ..schedule.from_config import plan_for
from ..schedule.plan import RunPlan
from .eval import Evaluator
from .metrics import MetricsWriter
from .progress import Progress


def build_engine(config: Config, layout: Layout):
    """The engine named by the config's `engine` field."""
    if config.engine == "deepspeed":
        from ..engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(config, layout)
    from ..engines.megatron import MegatronEngine

    return MegatronEngine(config, layout)


def open_data(config: Config, plan: RunPlan):
    """(batch source, validation streams); every data error is raised here, before any process group starts."""
    from ..data.source import BlendedSource, SyntheticSource

    if config.data.source == "synthetic":
        return SyntheticSource(config.model.vocab_size, config.model.seq_length, plan, config.train.seed), {}
    from ..data.pipeline import open_streams

    tokenizer, train_streams = open_streams(config, "train")
    _, valid_streams = open_streams(config, "valid")
    fim = {name for name, ds in config.data.datasets.items() if ds.fim}
    source = BlendedSource(train_streams, fim, plan, config.train.seed, tokenizer.eos_id, tokenizer.fim_ids)
    return source, valid_streams


def train(config: Config) -> list[dict]:
    """Train through every phase of the run; return each step's metrics record (on every rank)."""
    config.data_parallel_size(world_size_from_env())  # layout errors first, then plan and data errors
    plan = plan_for(config)
    source, valid_streams = open_data(config, plan)
    layout = setup_parallel(config)
    run_dir = Path(config.run_dir())
    metrics = MetricsWriter(run_dir, enabled=layout.is_main)
    try:
        if layout.is_main:
            (run_dir / "config.resolved.yaml").write_text(dump_config(config))
            print(plan.report(), flush=True)
        evaluator = Evaluator(valid_streams, config.data.eval_samples, config.train.micro_batch_size, layout) \
            if valid_streams else None
        records = _run(config, plan, layout, build_engine(config, layout), source, evaluator, metrics)
        if layout.is_main:
            metrics.close()
            from .plots import plot_run

            print("plots: " + ", ".join(str(p) for p in plot_run(run_dir)), flush=True)
        return records
    finally:
        metrics.close()
        teardown_parallel()


def _run(config: Config, plan: RunPlan, layout: Layout, engine, source, evaluator, metrics) -> list[dict]:
    t, m = config.train, config.model
    progress = Progress(plan.total_steps, enabled=layout.is_main)
    flops = flops_per_token(m)
    ends = {b.end_step for b in plan.boundaries()}
    records = []
    for step in range(plan.total_steps):
        start = time.perf_counter()
        _, phase, step_in_phase = plan.phase_at_step(step)
        if step_in_phase == 0 and step > 0 and phase.weights_only_start:
            engine.reset_optimizer()
            _say(layout, f"phase {phase.name}: starting from weights only (optimizer state reset)")
        elif step_in_phase == 0:
            _say(layout, f"phase {phase.name}: weights {phase.weights}, fim_rate {phase.fim_rate}")
        batch = source.global_batch(step)
        microbatches = rank_microbatches(batch.tokens, layout.dp_rank, layout.dp, t.micro_batch_size, batch.loss_mask)
        lr = plan.lr_at_step(step)
        result = engine.train_step(microbatches, lr)
        seconds = time.perf_counter() - start
        tokens_per_s = result.tokens / seconds
        tflops = flops * tokens_per_s / layout.world_size / 1e12
        record = {
            "step": step + 1,
            "phase": phase.name,
            "tokens": (step + 1) * plan.tokens_per_step,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "skipped": result.skipped,
            "step_time_s": seconds,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / t.peak_tflops_per_device if t.peak_tflops_per_device else None,
            "samples": batch.counts,
            "consumed_tokens": {name: n * m.seq_length for name, n in source.consumed_samples().items()},
        }
        last = step + 1 == plan.total_steps
        interval = config.data.eval_interval
        if evaluator and ((interval and (step + 1) % interval == 0) or step + 1 in ends or last):
            record["val_loss"] = evaluator.run(engine)
        records.append(record)
        metrics.write(record)
        if (step + 1) % t.log_interval == 0 or last or "val_loss" in record:
            extra = f"{phase.name} | grad {result.grad_norm:.3f}"
            if "val_loss" in record:
                extra += " | val " + " ".join(f"{k} {v:.3f}" for k, v in record["val_loss"].items())
            progress.line(step, result.loss, lr, tokens_per_s, extra)
    return records


def _say(layout: Layout, text: str) -> None:
    if layout.is_main:
        print(text, flush=True)
