"""The layout search behind `bench --plan`: every valid (tp, pp, vpp, dp, micro-batch, recomputation,
optimizer sharding) for a model and cluster, ranked by predicted tokens/s among those that fit in memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from .hardware import Cluster, Constants
from .shapes import RECOMPUTE, Layout, Shape
from .step import Estimate, estimate


@dataclass(frozen=True)
class Options:
    """What the search may vary; `fixed` pins Layout fields (e.g. a published run's tp, pp and dp)."""

    recompute: tuple[str, ...] = RECOMPUTE
    sharding: tuple[str, ...] = ("distributed_optimizer", "none")  # or "zero1".."zero3" (engine: deepspeed)
    max_micro_batch: int = 16
    max_vpp: int = 8
    fixed: tuple[tuple[str, object], ...] = ()


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def _shardings(names: Iterable[str]) -> Iterator[dict]:
    for name in names:
        if name == "distributed_optimizer":
            yield {"distributed_optimizer": True, "zero_stage": 0}
        elif name == "none":
            yield {"distributed_optimizer": False, "zero_stage": 0}
        else:
            yield {"distributed_optimizer": False, "zero_stage": int(name.removeprefix("zero"))}


def valid(shape: Shape, layout: Layout) -> bool:
    """Whether Megatron can run the layout: TP divides heads and the FFN, PP x VPP divides the layers, the batch
    splits into micro-batches, and interleaving has a multiple of pp micro-batches."""
    t, p, v = layout.tp, layout.pp, layout.vpp or 1
    if shape.heads % t or shape.ffn % t or (shape.kv_heads or shape.heads) % t or shape.vocab % t:
        return False
    if shape.layers % (p * v) or (layout.vpp and (p < 2 or layout.microbatches % p)):
        return False
    if layout.global_batch % (layout.micro_batch * layout.dp):
        return False
    return layout.sp is False or t > 1


def candidates(shape: Shape, cluster: Cluster, global_batch: int, options: Options, base: Layout) -> Iterator[Layout]:
    """Every valid layout of the cluster's devices, with `base`'s overlap settings and `options.fixed` pinned."""
    fixed = dict(options.fixed)
    devices = cluster.devices
    for tp in ([fixed["tp"]] if "tp" in fixed else _divisors(devices, cluster.devices_per_node)):
        for pp in ([fixed["pp"]] if "pp" in fixed else _divisors(shape.layers)):
            if devices % (tp * pp):
                continue
            dp = fixed.get("dp", devices // (tp * pp))
            if tp * pp * dp != devices:
                continue
            for mbs in ([fixed["micro_batch"]] if "micro_batch" in fixed
                        else _divisors(global_batch // dp, options.max_micro_batch) if global_batch % dp == 0 else []):
                vpps = [fixed["vpp"]] if "vpp" in fixed else \
                    [None] + [v for v in range(2, options.max_vpp + 1) if pp > 1]
                for vpp in vpps:
                    for recompute in ([fixed["recompute"]] if "recompute" in fixed else options.recompute):
                        shardings = [{"distributed_optimizer": fixed["distributed_optimizer"], "zero_stage": 0}] \
                            if "distributed_optimizer" in fixed else _shardings(options.sharding)
                        for shard in shardings:
                            if shard["zero_stage"] and tp * pp > 1:
                                continue  # DeepSpeed's ZeRO runs data parallelism only in megacrystal
                            layout = base.with_(tp=tp, pp=pp, dp=dp, micro_batch=mbs, vpp=vpp, recompute=recompute,
                                                global_batch=global_batch, sp=fixed.get("sp", tp > 1), **shard)
                            if valid(shape, layout):
                                yield layout


def rank(shape: Shape, cluster: Cluster, layouts: Iterable[Layout], c: Constants) -> list[tuple[Layout, Estimate]]:
    """Each layout with its estimate, fastest first; layouts that do not fit in memory after all that do."""
    scored = [(layout, estimate(shape, layout, cluster, c)) for layout in layouts]
    return sorted(scored, key=lambda le: (not le[1].memory.fits, -le[1].tokens_per_s))
