"""The training loop: the phase plan drives batches and LR; engines do the work; metrics come out."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from ..config import Config, dump_config
from ..data.batches import rank_microbatches
from ..distributed.runtime import Layout, setup_parallel, teardown_parallel, world_size_from_env
from ..model.size import flops_per_token
from ..schedule.from_config import plan_for
from ..schedule.plan import RunPlan
from .checkpointing import Checkpointer
from .domain_loss import loss_per_dataset, token_bytes_for
from .eval import Evaluator
from .metrics import MetricsWriter, truncate_jsonl
from .profiling import StepProfiler
from .progress import Progress
from .signals import Preempted, StopWatch


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


def train(config: Config, resume: str = "auto") -> list[dict]:
    """Train through every phase of the run; return the metrics records of the steps run (on every rank).

    `resume` is auto (the newest intact checkpoint, if any), a checkpoint path, or none. A stop signal or the
    time budget ends the run early with a checkpoint by raising Preempted.
    """
    config.data_parallel_size(world_size_from_env())  # layout errors first, then plan and data errors
    if config.engine == "deepspeed":
        from ..engines.deepspeed_config import validate

        validate(config, world_size_from_env())
    plan = plan_for(config)
    source, valid_streams = open_data(config, plan)
    layout = setup_parallel(config)
    run_dir = Path(config.run_dir())
    try:
        engine = build_engine(config, layout)
        checkpointer = Checkpointer(config, layout, engine, source)
        state = checkpointer.resume(resume)
        change = None
        if state and state.get("weights_only"):  # imported weights: a fresh run that starts from them
            _say(layout, f"starting from the weights of {state['path']} (fresh optimizer and data cursors)")
            state = None
        start = state["step"] if state else 0
        if state:
            change = source.load_state_dict(state["data"])
            _say(layout, f"resumed from {state['path']} at step {start} (phase {state['phase']})")
            if change is not None:
                _say(layout, f"blend change: {change.describe()}")
        metrics = MetricsWriter(run_dir, enabled=layout.is_main, resumed_step=start)
        if layout.is_main:
            (run_dir / "config.resolved.yaml").write_text(dump_config(config))
            if config.data.log_samples:
                truncate_jsonl(run_dir / "samples.jsonl", start)
            print(plan.report(), flush=True)
        evaluator = Evaluator(valid_streams, config.data.eval_samples, config.train.micro_batch_size, layout,
                              token_bytes_for(config)) if valid_streams else None
        loop = _Loop(config, plan, layout, engine, source, evaluator, metrics, checkpointer)
        try:
            records = loop.run(start, events=[f"blend change: {change.describe()}"] if change else [])
        finally:
            metrics.close()
        if layout.is_main:
            from .plots import plot_run

            print("plots: " + ", ".join(str(p) for p in plot_run(run_dir)), flush=True)
        return records
    finally:
        teardown_parallel()


class _Loop:
    """One pass over the plan's steps from a start step, with evaluation, checkpoints and stop requests."""

    def __init__(self, config, plan, layout, engine, source, evaluator, metrics, checkpointer):
        self.config, self.plan, self.layout, self.engine = config, plan, layout, engine
        self.source, self.evaluator, self.metrics, self.checkpointer = source, evaluator, metrics, checkpointer
        self.ends = {b.end_step for b in plan.boundaries()}
        self.flops_per_token = flops_per_token(config.model)
        self.samples_log = Path(config.run_dir()) / "samples.jsonl" if config.data.log_samples else None

    def run(self, start: int, events: list[str]) -> list[dict]:
        t, c = self.config.train, self.config.checkpoint
        progress = Progress(self.plan.total_steps, first_step=start, enabled=self.layout.is_main)
        watch = StopWatch(c.stop_signals, c.time_limit_s, self.layout.device)
        profiler = StepProfiler(t.profile_steps, Path(self.config.run_dir()), self.layout.rank)
        records = []
        log_seconds = 0.0
        try:
            for step in range(start, self.plan.total_steps):
                with profiler.around(step):
                    record = self._step(step)
                if events:
                    record["events"], events = events, []
                reason, record["memory_mb"] = watch.should_stop(record["step_time_s"], _peak_memory_mb())
                record["log_time_s"] = log_seconds  # writing the previous step's metrics and progress line
                records.append(record)
                logged = time.perf_counter()
                self.metrics.write(record)
                if (step + 1) % t.log_interval == 0 or step + 1 == self.plan.total_steps or "val_loss" in record:
                    extra = f"{record['phase']} | grad {record['grad_norm']:.3f}"
                    if "val_loss" in record:
                        extra += " | val " + " ".join(f"{k} {v:.3f}" for k, v in record["val_loss"].items())
                    progress.line(step, record["loss"], record["lr"], record["tokens_per_s"], extra)
                log_seconds = time.perf_counter() - logged
                last = step + 1 == self.plan.total_steps
                phase_end = step + 1 in self.ends
                if (c.interval and (step + 1) % c.interval == 0) or (phase_end and c.phase_end) or last or reason:
                    self._save(step, record, phase_end)
                if reason and not last:
                    raise Preempted(step + 1, reason)
        finally:
            watch.restore()
        return records

    def _step(self, step: int) -> dict:
        t, m = self.config.train, self.config.model
        layout, plan = self.layout, self.plan
        started = time.perf_counter()
        _, phase, step_in_phase = plan.phase_at_step(step)
        if step_in_phase == 0 and step > 0 and phase.weights_only_start:
            self.engine.reset_optimizer()
            _say(layout, f"phase {phase.name}: starting from weights only (optimizer state reset)")
        elif step_in_phase == 0:
            _say(layout, f"phase {phase.name}: weights {phase.weights}, fim_rate {phase.fim_rate}")
        batch = self.source.global_batch(step)
        if self.samples_log and layout.is_main:
            with open(self.samples_log, "a") as f:
                f.write(json.dumps({"step": step + 1, "samples": batch.samples}) + "\n")
        microbatches = rank_microbatches(batch.tokens, layout.dp_rank, layout.dp, t.micro_batch_size, batch.loss_mask)
        data_seconds = time.perf_counter() - started
        lr = plan.lr_at_step(step)
        result = self.engine.train_step(microbatches, lr)
        seconds = time.perf_counter() - started
        tokens_per_s = result.tokens / seconds
        tflops = self.flops_per_token * tokens_per_s / layout.world_size / 1e12
        record = {
            "step": step + 1,
            "phase": phase.name,
            "tokens": (step + 1) * plan.tokens_per_step,
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "skipped": result.skipped,
            "step_time_s": seconds,
            "data_time_s": data_seconds,  # part of step_time_s: drawing, reading and slicing the batch
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / t.peak_tflops_per_device if t.peak_tflops_per_device else None,
            "samples": batch.counts,
            "consumed_tokens": {name: n * m.seq_length for name, n in self.source.consumed_samples().items()},
        }
        if result.row_losses is not None:
            record["loss_per_dataset"] = loss_per_dataset(result.row_losses, batch.samples)
        interval = self.config.data.eval_interval
        if self.evaluator and ((interval and (step + 1) % interval == 0) or step + 1 in self.ends):
            record["val_loss"] = self.evaluator.run(self.engine)
            record.update(self.evaluator.bpb())
        return record

    def _save(self, step: int, record: dict, phase_end: bool) -> None:
        state = {"step": step + 1, "tokens": record["tokens"], "phase": record["phase"],
                 "consumed_tokens": record["consumed_tokens"], "data": self.source.state_dict()}
        path = self.checkpointer.save(state, phase_end)
        _say(self.layout, f"checkpoint saved: {path}")


def _peak_memory_mb() -> float:
    """This process's peak memory: device memory on a GPU, resident set size on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM is this process image's own peak; Linux carries ru_maxrss across fork + exec, so a launcher that had
    # grown large (the bench, after an in-process baseline) would show its own peak in every point it starts.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _say(layout: Layout, text: str) -> None:
    if layout.is_main:
        print(text, flush=True)
