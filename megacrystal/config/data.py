"""The data part of the run schema: tokenizer, datasets, and the phases of the run."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from .base import Section, require

# An input may name a domain of the embedded default corpus instead of a path.
CORPUS_PREFIX = "corpus:"
WEIGHT_TOLERANCE = 1e-6


class TokenizerSection(Section):
    model: Optional[str] = None  # an existing SentencePiece .model (e.g. LLaMA's); None: train one
    vocab_size: int = Field(2000, ge=64)  # base vocabulary when training; 18 StarCoder tokens follow it
    train_on: list[str] = ["prose", "python", "web"]  # datasets whose inputs train the tokenizer


class DatasetSection(Section):
    inputs: list[str] = Field(min_length=1)  # JSONL / text files / source directories, or corpus:<domain>
    text_field: str = "text"  # a dotted path for nested fields, e.g. meta.text
    # Keep only records whose field (dotted path, e.g. meta.redpajama_set_name, or StarCoder's lang) has one
    # of the listed values, so one source file can feed several datasets of a blend.
    filters: dict[str, list[str]] = {}
    fim: bool = False  # a code dataset: fill-in-the-middle at the phase's fim_rate


class LRSection(Section):
    """A phase's LR segment: warmup from `start` to `peak`, then decay to `end` (Crystal re-warms per phase)."""

    peak: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    end: float = Field(0.0, ge=0)
    decay_steps: Optional[int] = Field(None, ge=0)  # None: decay over the rest of the phase
    start: float = Field(0.0, ge=0)
    style: Literal["linear", "cosine", "1-sqrt"] = "linear"
    # WSD: hold the peak after warmup and decay over the last fraction of the phase (0: never decay);
    # excludes decay_steps. A cooldown phase instead uses warmup_steps 0 and decays over its whole length.
    decay_fraction: Optional[float] = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _check_decay(self) -> "LRSection":
        require(self.decay_fraction is None or self.decay_steps is None, "lr.decay_fraction",
                "excludes lr.decay_steps; set one of them")
        return self


class MixingSection(Section):
    """Online mixing (DoReMi, Xie et al. 2023; ODM, Albalak et al. 2023): every `every` steps the phase's weights
    move toward the datasets whose training loss is furthest above its reference (data/mixing.py)."""

    mode: Literal["online", "static"] = "online"  # static: the phase keeps its weights (as without `mixing`)
    rule: Literal["eg", "exp3"] = "eg"  # eg: DoReMi's exponentiated gradient; exp3: ODM's smoothed-reward softmax
    eta: float = Field(1.0, gt=0)  # step size on the excess loss (nats)
    every: int = Field(10, ge=1)  # steps per update window
    epsilon: float = Field(0.05, ge=0, le=1)  # share of the uniform blend mixed in (exploration, a floor)
    # fixed: epsilon at every update; decay: ODM's schedule, a uniform share of min(1, sqrt(K ln K / t)) at an
    # update t steps into the phase (K datasets), never below epsilon (0 gives ODM's exactly)
    exploration: Literal["fixed", "decay"] = "fixed"
    smoothing: float = Field(0.0, ge=0, lt=1)  # moving-average factor of the per-dataset loss across windows
    # first: the loss of the phase's first window; none: the loss itself; {dataset: loss}: a reference model's
    # loss per dataset (DoReMi), the excess then clipped at 0
    reference: Union[Literal["first", "none"], dict[str, float]] = "first"
    grid: int = Field(1024, ge=2)  # weights are multiples of 1/grid, so every layout draws the same batches


class PhaseSection(Section):
    tokens: int = Field(gt=0)  # budget; rounded to whole global batches (reported at start)
    weights: dict[str, float] = Field(min_length=1)  # dataset name -> sampling weight
    lr: LRSection
    fim_rate: float = Field(0.0, ge=0, le=1)
    weights_only_start: bool = False  # reset optimizer state at this phase's start (Crystal phase 3)
    mixing: Optional[MixingSection] = None  # None: the weights hold for the whole phase


class DataSection(Section):
    source: Literal["synthetic", "indexed"] = "synthetic"
    dir: str = "data/{name}"  # prepared corpus, tokenizer and datasets; "{name}" is run.name
    tokenizer: TokenizerSection = TokenizerSection()
    datasets: dict[str, DatasetSection] = {}
    phases: dict[str, PhaseSection] = {}  # in run order
    renormalize: bool = False  # scale each phase's weights to sum 1 instead of rejecting them
    corpus_max_bytes: int = Field(3_000_000, gt=0)  # per domain of the embedded corpus
    valid_fraction: float = Field(0.01, ge=0, lt=1)
    workers: int = Field(2, ge=1)  # tokenizer threads in `megacrystal prepare` (and dedup processes)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)  # bad records skipped (and reported) up to this share
    shard_bytes: int = Field(256 << 20, gt=0)  # input bytes per output shard of `megacrystal prepare`
    dedup: Literal["none", "exact", "near"] = "none"  # across the datasets of the blend; near includes exact
    dedup_threshold: float = Field(0.8, gt=0, le=1)  # MinHash LSH Jaccard threshold (SlimPajama: 0.8)
    dedup_ngram: int = Field(13, ge=1)  # word n-grams hashed by MinHash (SlimPajama: 13)
    allow_data_change: bool = False  # resume a run whose prepared datasets changed (train --allow-data-change)
    eval_interval: Optional[int] = Field(None, gt=0)  # steps; evaluation also runs at every phase end
    eval_samples: int = Field(8, gt=0)  # validation sequences per dataset
    log_samples: bool = False  # write every global batch's (dataset, sample) ids to <run.dir>/samples.jsonl

    @model_validator(mode="after")
    def _check_phases(self) -> "DataSection":
        require(not self.phases or self.source == "indexed", "data.phases",
                "phases blend prepared datasets; set data.source: indexed")
        require(self.source != "indexed" or bool(self.phases), "data.phases",
                "data.source: indexed needs at least one phase")
        for phase_name, phase in self.phases.items():
            for dataset, weight in phase.weights.items():
                field = f"data.phases.{phase_name}.weights.{dataset}"
                require(dataset in self.datasets, field,
                        f"unknown dataset; data.datasets has {', '.join(self.datasets) or 'none'}")
                require(weight >= 0, field, f"negative weight {weight}")
            total = sum(phase.weights.values())
            require(total > 0, f"data.phases.{phase_name}.weights", "all weights are zero")
            require(self.renormalize or abs(total - 1) <= WEIGHT_TOLERANCE, f"data.phases.{phase_name}.weights",
                    f"sum to {total:.6g}, not 1; fix them or set data.renormalize=true")
            _check_mixing(phase_name, phase)
        if self.source == "indexed" and self.tokenizer.model is None:
            for name in self.tokenizer.train_on:
                require(name in self.datasets, "data.tokenizer.train_on", f"unknown dataset {name!r}")
        return self


def _check_mixing(phase_name: str, phase: PhaseSection) -> None:
    """An online phase blends at least two datasets and gives a reference loss to exactly those."""
    mixing = phase.mixing
    if mixing is None or mixing.mode == "static":
        return
    field = f"data.phases.{phase_name}.mixing"
    require(len(phase.weights) >= 2, field, "online mixing needs at least two datasets in the phase's weights")
    if isinstance(mixing.reference, dict):
        names = sorted(phase.weights)
        require(sorted(mixing.reference) == names, f"{field}.reference",
                f"give a loss for each of the phase's datasets ({', '.join(names)}), got "
                f"{', '.join(sorted(mixing.reference)) or 'none'}")
