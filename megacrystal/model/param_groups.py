"""muP optimizer groups (crystal-spec §1.4): hidden kernels at lr x width_scale, no decay on norms and biases."""
from __future__ import annotations

from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

from ..config.schema import ModelSection
from .names import param_kind


def group_multipliers(model: ModelSection, kind: str) -> tuple[float, float]:
    """(lr multiplier, weight-decay multiplier) for a parameter kind."""
    lr_mult = model.mup_width_scale if kind in ("hidden", "output") else 1.0
    wd_mult = 0.0 if kind in ("norm", "bias") else 1.0
    return lr_mult, wd_mult


def megatron_group_overrides(model: ModelSection) -> dict:
    """config_overrides for megatron's get_megatron_optimizer, one override per muP group.

    Names seen here are local (a chunk's own layer index), which is all param_kind needs.
    """
    overrides = {}
    for kind in ("hidden", "output", "norm", "bias", "embedding"):
        lr_mult, wd_mult = group_multipliers(model, kind)
        if (lr_mult, wd_mult) == (1.0, 1.0):
            continue
        predicate = ParamWithNamePredicate(
            name=f"crystal_{kind}", fn=lambda p, n, kind=kind: param_kind(n.removeprefix("module."), p.dim()) == kind)
        overrides[ParamKey(with_name_predicate=predicate)] = {"lr_mult": lr_mult, "wd_mult": wd_mult}
    return overrides
