"""The run schema: one typed tree, validated once; every error names its dotted field."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import Section as _Section
from .base import require as _require
from .data import DataSection


class RunSection(_Section):
    name: str = "crystal"
    dir: str = "runs/{name}"  # "{name}" is replaced by run.name


class InitSection(_Section):
    """muP initialisation: truncated normal at +-truncation*std (Crystal: 2 sigma)."""

    embedding_std: float = Field(0.073, gt=0)
    hidden_std: float = Field(0.01825, gt=0)
    output_std: float = Field(0.00228125, gt=0)
    truncation: float = Field(2.0, gt=0)


class ModelSection(_Section):
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)  # embedding rows (padded vocabulary)
    seq_length: int = Field(gt=1)
    layernorm_eps: float = Field(1e-5, gt=0)
    rotary_percent: float = Field(0.25, gt=0, le=1)
    rotary_base: float = Field(10000.0, gt=0)
    rotary_interleaved: bool = True  # GPT-J rotate-every-two layout, as Crystal
    scale_qk_dot_by_d: bool = True  # muP attention: scores / head_dim instead of / sqrt(head_dim)
    embeddings_scale: float = 14.6
    output_logits_scale: float = 0.13875  # mup_output_alpha (2.22) * mup_width_scale (0.0625)
    mup_width_scale: float = Field(0.0625, gt=0)  # LR multiplier of the hidden weight matrices
    init: InitSection = InitSection()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)


class OptimSection(_Section):
    # Without data.phases: one LR segment over train.steps (warmup to lr, decay to end_lr). With phases, each
    # phase brings its own segment. Hidden matrices train at lr x model.mup_width_scale either way.
    lr: Optional[float] = Field(None, gt=0)
    end_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    decay_style: Literal["linear", "cosine", "1-sqrt"] = "linear"
    decay_fraction: Optional[float] = Field(None, ge=0, le=1)  # WSD: decay over the last fraction of the run
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-9, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    clip_grad: float = Field(1.0, ge=0)  # 0 disables clipping


class ParallelSection(_Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    vpp: Optional[int] = Field(None, ge=2)  # virtual stages per pipeline rank (interleaved 1F1B)
    sp: bool = False  # sequence parallelism (needs tp > 1)
    distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks
    # Start each gradient bucket's data-parallel all-reduce (reduce-scatter) as soon as backward has filled it,
    # overlapping communication with the rest of backward; buckets of grad_bucket_size parameters (None:
    # megatron's default, max(40M, 1M x dp), which gives a small model a single bucket and nothing to overlap).
    overlap_grad_reduce: bool = False
    grad_bucket_size: Optional[int] = Field(None, gt=0)
    # On a CPU with every data-parallel rank on one host: sum the gradients in shared memory after backward
    # (distributed/shm_reduce.py) instead of gloo over TCP; overlap_grad_reduce then has nothing to overlap.
    shared_memory_grad_reduce: bool = True


class DeepSpeedSection(_Section):
    zero_stage: int = Field(1, ge=0, le=3)
    config: Optional[str] = None  # a user's DeepSpeed JSON, merged over the generated one


class TrainSection(_Section):
    steps: Optional[int] = Field(None, gt=0)  # without data.phases; with phases their budgets decide
    # stop after this global step with a checkpoint, short of the plan (phase budgets unchanged); a later run
    # with a larger value, or none, resumes from it. Like Megatron's --exit-interval.
    max_steps: Optional[int] = Field(None, gt=0)
    global_batch_size: int = Field(gt=0)
    micro_batch_size: int = Field(1, gt=0)
    seed: int = 1234
    log_interval: int = Field(1, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    # auto: this rank's GPU (NCCL) when torch sees one, else the CPU (gloo); cuda refuses to start without a GPU
    device: Literal["auto", "cuda", "cpu"] = "auto"
    threads: Optional[int] = Field(None, ge=1)  # CPU threads per rank; default: cores / local ranks
    peak_tflops_per_device: Optional[float] = Field(None, gt=0)  # for MFU; None: not reported
    # torch.compile every transformer layer (inductor; compiled graphs are cached on disk by inductor's FX graph
    # cache, so only the first run on a machine pays the full compile time)
    compile: bool = False
    # torch.profiler over these steps (1-based, inclusive): <run.dir>/profile/ gets a per-op table and a trace
    profile_steps: Optional[tuple[int, int]] = None

    @model_validator(mode="after")
    def _check_profile(self) -> "TrainSection":
        if self.profile_steps:
            first, last = self.profile_steps
            _require(1 <= first <= last, "train.profile_steps", f"[{first}, {last}] must be [first, last] with "
                     "1 <= first <= last")
        return self


Switch = Literal["auto", "off"]


class KernelsSection(_Section):
    """Which fast kernels the model may use (megacrystal/kernels/select.py decides from the device and what is
    importable). `auto`: the fast kernel where it exists and keeps Crystal's numerics; `off`: the torch path."""

    transformer_engine: Switch = "auto"  # CUDA: Transformer Engine's layer spec (linears, norms, attention)
    fused_layernorm: Switch = "auto"  # CUDA without TE: apex's fused LayerNorm in megatron's local spec
    fused_adam: Switch = "auto"  # CUDA: TE's or apex's FusedAdam (megatron's pick); off: torch AdamW
    attention: Switch = "auto"  # CPU: megacrystal's causal kernels; CUDA: TE's flash/fused or torch's SDPA
    rotary: Switch = "auto"  # CPU: rotary inside the attention copy; CUDA: TE's fused RoPE (TE >= 2.3)
    swiglu: Switch = "auto"  # CPU: one-node SwiGLU; CUDA: megatron's fused bias-SwiGLU
    bias_dropout_fusion: Switch = "auto"  # CUDA: megatron's fused bias + dropout + residual add
    vocab: Switch = "auto"  # CPU: embedding / output layer writing the tied weight's main_grad directly
    cross_entropy: Switch = "auto"  # CPU: blockwise fp32 cross entropy; CUDA: megatron's fused one
    gradient_accumulation_fusion: Switch = "auto"  # CUDA with TE or apex: weight gradients into main_grad

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` as false (and `on` as true)
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class CheckpointSection(_Section):
    interval: Optional[int] = Field(None, gt=0)  # steps between saves; phase ends and the last step always save
    keep: int = Field(3, ge=1)  # newest checkpoints kept, besides every phase-end one
    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    phase_end: bool = True  # also save (and keep) a checkpoint at the end of every phase
    stop_signals: list[str] = ["SIGTERM", "SIGINT", "SIGUSR1"]  # save at the next step boundary, then exit 75
    time_limit_s: Optional[float] = Field(None, gt=0)  # wall-clock budget: save and exit 75 before it runs out

    @model_validator(mode="after")
    def _check_signals(self) -> "CheckpointSection":
        import signal

        for name in self.stop_signals:
            _require(name in signal.Signals.__members__, "checkpoint.stop_signals",
                     f"{name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        return self


class Config(_Section):
    engine: Literal["megatron", "deepspeed"] = "megatron"
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    run: RunSection = RunSection()
    model: ModelSection
    optim: OptimSection
    parallel: ParallelSection = ParallelSection()
    train: TrainSection
    data: DataSection = DataSection()
    checkpoint: CheckpointSection = CheckpointSection()
    kernels: KernelsSection = KernelsSection()

    @model_validator(mode="after")
    def _check_shapes(self) -> "Config":
        m, p, t, d = self.model, self.parallel, self.train, self.data
        if d.phases:
            _require(t.steps is None, "train.steps", "omit it: data.phases set the token budgets")
        else:
            _require(t.steps is not None, "train.steps", "required when data.phases is empty")
            _require(self.optim.lr is not None, "optim.lr", "required when data.phases is empty")
        _require(m.hidden_size % m.num_heads == 0, "model.num_heads",
                 f"{m.num_heads} does not divide model.hidden_size ({m.hidden_size})")
        rot = m.head_dim * m.rotary_percent
        _require(rot == int(rot) and int(rot) % 2 == 0, "model.rotary_percent",
                 f"{m.rotary_percent} x head_dim {m.head_dim} must be an even whole number of dims")
        _require(m.num_heads % p.tp == 0, "parallel.tp",
                 f"{p.tp} does not divide model.num_heads ({m.num_heads}); choose a tp that divides it")
        _require(m.ffn_hidden_size % p.tp == 0, "parallel.tp",
                 f"{p.tp} does not divide model.ffn_hidden_size ({m.ffn_hidden_size})")
        _require(m.vocab_size % p.tp == 0, "parallel.tp",
                 f"{p.tp} does not divide model.vocab_size ({m.vocab_size}); pad the vocabulary")
        stages = p.pp * (p.vpp or 1)
        _require(m.num_layers % stages == 0, "parallel.pp",
                 f"pp x vpp = {stages} does not divide model.num_layers ({m.num_layers})")
        _require(p.vpp is None or p.pp > 1, "parallel.vpp", "virtual stages need parallel.pp > 1")
        _require(not p.sp or p.tp > 1, "parallel.sp", "sequence parallelism needs parallel.tp > 1")
        _require(not p.sp or m.seq_length % p.tp == 0, "parallel.sp",
                 f"parallel.tp ({p.tp}) must divide model.seq_length ({m.seq_length})")
        _require(self.engine != "deepspeed" or not self.train.compile, "train.compile",
                 "only with engine: megatron; set it false for engine: deepspeed")
        _require(self.engine != "deepspeed" or p.pp == 1, "parallel.pp",
                 "pipeline parallelism is not supported with engine: deepspeed; use engine: megatron or pp=1")
        for name, phase in d.phases.items():
            _require(self.engine != "deepspeed" or not phase.mixing or phase.mixing.mode == "static",
                     f"data.phases.{name}.mixing", "online mixing needs the per-row training losses only engine: "
                     "megatron reports; use engine: megatron or mixing.mode: static")
        _require(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
                 f"{t.global_batch_size} is not a multiple of train.micro_batch_size ({t.micro_batch_size})")
        return self

    def data_parallel_size(self, world_size: int) -> int:
        """Data parallelism is what the world size leaves after TP x PP."""
        from .errors import ConfigError

        mp = self.parallel.tp * self.parallel.pp
        if world_size % mp:
            raise ConfigError(f"parallel: world size {world_size} is not divisible by tp x pp = {mp}; "
                              f"launch a multiple of {mp} processes or change parallel.tp/parallel.pp")
        dp = world_size // mp
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(f"train.global_batch_size: {self.train.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size x data-parallel size = {per_step}")
        microbatches = self.train.global_batch_size // per_step
        if self.parallel.vpp and microbatches % self.parallel.pp:
            raise ConfigError(f"parallel.vpp: interleaved pipelining needs micro-batches per rank "
                              f"({microbatches}) to be a multiple of parallel.pp ({self.parallel.pp})")
        return dp

    def run_dir(self) -> str:
        return self.run.dir.format(name=self.run.name)

    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir.format(name=self.run.name) if self.checkpoint.dir else f"{self.run_dir()}/checkpoints"
