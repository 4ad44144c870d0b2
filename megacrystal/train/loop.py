"""The training loop: batches in, optimizer steps, metrics out. Thin on purpose; engines do the work."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import Config, dump_config
from ..data.batches import rank_microbatches
from ..data.synthetic import SyntheticTokens
from ..distributed.runtime import Layout, setup_parallel, teardown_parallel
from ..model.size import flops_per_token
from ..schedule.lr import LRSegment, lr_at
from .metrics import MetricsWriter
from .progress import Progress


def build_engine(config: Config, layout: Layout):
    """The engine named by train.engine."""
    from ..engines.megatron import MegatronEngine

    return MegatronEngine(config, layout)


def lr_segment(config: Config) -> LRSegment:
    """The run's LR schedule: warmup to optim.lr, then decay to optim.end_lr over the remaining steps."""
    o = config.optim
    return LRSegment(peak=o.lr, warmup_steps=o.warmup_steps, end=o.end_lr, style=o.decay_style)


def train(config: Config) -> list[dict]:
    """Run config.train.steps optimizer steps; return every step's metrics record (on every rank)."""
    layout = setup_parallel(config)
    run_dir = Path(config.run_dir())
    metrics = MetricsWriter(run_dir, enabled=layout.is_main)
    try:
        if layout.is_main:
            (run_dir / "config.resolved.yaml").write_text(dump_config(config))
        return _train_steps(config, layout, build_engine(config, layout), metrics)
    finally:
        metrics.close()
        teardown_parallel()


def _train_steps(config: Config, layout: Layout, engine, metrics: MetricsWriter) -> list[dict]:
    t, m = config.train, config.model
    source = SyntheticTokens(m.vocab_size, m.seq_length, t.seed)
    segment = lr_segment(config)
    progress = Progress(t.steps, enabled=layout.is_main)
    flops = flops_per_token(m)
    records = []
    for step in range(t.steps):
        start = time.perf_counter()
        batch = source.global_batch(step, t.global_batch_size)
        microbatches = rank_microbatches(batch, layout.dp_rank, layout.dp, t.micro_batch_size)
        lr = lr_at(segment, step, t.steps)
        result = engine.train_step(microbatches, lr)
        seconds = time.perf_counter() - start
        tokens_per_s = result.tokens / seconds
        tflops = flops * tokens_per_s / layout.world_size / 1e12
        record = {
            "step": step + 1,
            "tokens": (step + 1) * t.global_batch_size * m.seq_length,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "skipped": result.skipped,
            "step_time_s": seconds,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / t.peak_tflops_per_device if t.peak_tflops_per_device else None,
        }
        records.append(record)
        metrics.write(record)
        if (step + 1) % t.log_interval == 0 or step + 1 == t.steps:
            progress.line(step, result.loss, lr, tokens_per_s, f"grad {result.grad_norm:.3f}")
    return records
