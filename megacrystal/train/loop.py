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
from .cadence import Cadence, End
from .checkpointing import Checkpointer
from .domain_loss import means, sums_per_dataset, token_bytes_for
from .eval import Evaluator
from .metrics import MetricsWriter
from .profiling import StepProfiler
from .progress import Progress
from .records import StepRecord, metrics_path, read_records, truncate_jsonl
from .signals import Preempted, StopWatch
from .summary import run_summary


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


def train(config: Config, resume: str = "auto") -> list[StepRecord]:
    """Train through every phase of the run (or to train.max_steps); return the step records of the steps run
    (on every rank).

    `resume` is auto (the newest intact checkpoint, if any), a checkpoint path, or none. A stop signal or the
    time budget ends the run early with a checkpoint by raising Preempted.
    """
    started = time.perf_counter()
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
            if layout.is_main and loop.end:  # a run that failed gets no summary
                _finish(run_dir, loop, start, time.perf_counter() - started)
        return records
    finally:
        teardown_parallel()


def _finish(run_dir: Path, loop: _Loop, start: int, wall_s: float) -> None:
    """Plots (not after a stop request: its time goes to exiting) and the end-of-run summary."""
    plots = []
    if loop.end != "stop_request":
        from .plots import plot_run

        plots = plot_run(run_dir)
    print(run_summary(read_records(run_dir), start, wall_s, loop.end_note, loop.checkpoint, plots,
                      metrics_path(run_dir)), flush=True)


class _Loop:
    """One pass over the plan's steps from a start step, with evaluation, checkpoints and stop requests."""

    def __init__(self, config, plan, layout, engine, source, evaluator, metrics, checkpointer):
        self.config, self.plan, self.layout, self.engine = config, plan, layout, engine
        self.source, self.evaluator, self.metrics, self.checkpointer = source, evaluator, metrics, checkpointer
        self.cadence = Cadence.for_run(config, plan, evaluates=evaluator is not None)
        self.flops_per_token = flops_per_token(config.model)
        self.samples_log = Path(config.run_dir()) / "samples.jsonl" if config.data.log_samples else None
        self.checkpoint: str | None = None  # the last checkpoint this session saved
        self.end: End | None = None  # why the run ended; None while it runs or when it failed
        self.end_note = ""

    def run(self, start: int, events: list[str]) -> list[StepRecord]:
        t, c = self.config.train, self.config.checkpoint
        if start >= self.cadence.last_step:  # nothing left: say why in the summary
            self.end = "plan" if start >= self.plan.total_steps else "max_steps"
            self.end_note = _END_NOTES[self.end].format(max_steps=t.max_steps) + " before this session"
            return []
        progress = Progress(self.cadence.last_step, first_step=start, enabled=self.layout.is_main)
        watch = StopWatch(c.stop_signals, c.time_limit_s, self.layout.device)
        profiler = StepProfiler(t.profile_steps, Path(self.config.run_dir()), self.layout.rank)
        records = []
        log_seconds = 0.0
        try:
            for step in range(start, self.cadence.last_step):
                with profiler.around(step):
                    record = self._step(step)
                record.events, events = events or None, []
                reason, record.memory_mb = watch.should_stop(record.step_time_s, _peak_memory_mb())
                act = self.cadence.decide(step + 1, stop_requested=reason is not None)
                if act.eval:
                    record.eval = self.evaluator.run(self.engine)
                record.log_time_s = log_seconds  # writing the previous step's metrics and progress line
                records.append(record)
                logged = time.perf_counter()
                self.metrics.write(record)
                if act.log:
                    progress.line(step, record.loss, record.lr, record.tokens_per_s, _extra(record))
                log_seconds = time.perf_counter() - logged
                if act.checkpoint:
                    self._save(record, act.phase_end)
                if act.end:
                    self.end, self.end_note = act.end, _END_NOTES[act.end].format(max_steps=t.max_steps, reason=reason)
                if act.end == "stop_request":
                    raise Preempted(step + 1, reason)
        finally:
            watch.restore()
        return records

    def _step(self, step: int) -> StepRecord:
        t, m = self.config.train, self.config.model
        layout, plan = self.layout, self.plan
        started = time.perf_counter()
        _, phase, step_in_phase = plan.phase_at_step(step)
        if step_in_phase == 0 and step > 0 and phase.weights_only_start:
            self.engine.reset_optimizer()
            _say(layout, f"phase {phase.name}: starting from weights only (optimizer state reset)")
        elif step_in_phase == 0:
            mixing = f", mixing {phase.mixing.describe()}" if phase.mixing else ""
            _say(layout, f"phase {phase.name}: weights {phase.weights}, fim_rate {phase.fim_rate}{mixing}")
        batch = self.source.global_batch(step)
        if self.samples_log and layout.is_main:
            with open(self.samples_log, "a") as f:
                f.write(json.dumps({"step": step + 1, "samples": batch.samples}) + "\n")
        microbatches = rank_microbatches(batch.tokens, layout.dp_rank, layout.dp, t.micro_batch_size, batch.loss_mask)
        data_seconds = time.perf_counter() - started
        lr = plan.lr_at_step(step)
        result = self.engine.train_step(microbatches, lr)
        sums = None if result.row_losses is None else sums_per_dataset(result.row_losses, batch.samples)
        self.source.observe(step, sums)  # online mixing: may set the weights of the batches from step + 1 on
        seconds = time.perf_counter() - started
        tokens_per_s = result.tokens / seconds
        tflops = self.flops_per_token * tokens_per_s / layout.world_size / 1e12
        return StepRecord(
            step=step + 1, phase=phase.name, tokens=(step + 1) * plan.tokens_per_step, loss=result.loss, lr=lr,
            grad_norm=result.grad_norm, skipped=result.skipped, step_time_s=seconds, data_time_s=data_seconds,
            tokens_per_s=tokens_per_s, tflops_per_device=tflops,
            mfu=tflops / t.peak_tflops_per_device if t.peak_tflops_per_device else None,
            samples=batch.counts,
            consumed_tokens={name: n * m.seq_length for name, n in self.source.consumed_samples().items()},
            loss_per_dataset=None if sums is None else means(sums), blend_weights=batch.blend_weights,
        )

    def _save(self, record: StepRecord, phase_end: bool) -> None:
        state = {"step": record.step, "tokens": record.tokens, "phase": record.phase,
                 "consumed_tokens": record.consumed_tokens, "data": self.source.state_dict()}
        self.checkpoint = str(self.checkpointer.save(state, phase_end))
        _say(self.layout, f"checkpoint saved: {self.checkpoint}")


_END_NOTES = {"plan": "plan complete", "max_steps": "train.max_steps {max_steps} reached",
              "stop_request": "stopped: {reason}"}


def _extra(record: StepRecord) -> str:
    """The progress line's tail: phase, gradient norm and, after an evaluation, the validation losses."""
    extra = f"{record.phase} | grad {record.grad_norm:.3f}"
    if record.blend_weights is not None:
        extra += " | weights " + " ".join(f"{k} {v:.3f}" for k, v in record.blend_weights.items())
    if record.eval is not None:
        extra += " | val " + " ".join(f"{k} {v:.3f}" for k, v in record.eval.loss_per_dataset.items())
    return extra


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
