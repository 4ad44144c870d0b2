"""The pipeline schedule: how long m micro-batches take through p stages, and the bubble.

1F1B (Narayanan et al. 2021, section 2.2.1) keeps every stage busy except for (p - 1) micro-batch slots while
the pipeline fills and drains: step = (m + p - 1) x t. The interleaved schedule gives each rank v chunks of
layers, so a slot is 1/v as long and the bubble shrinks to (p - 1) / v slots of the whole stage's time, for v
times as many pipeline sends. The slowest stage (the last one also runs the output layer) sets the pace.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineTime:
    busy_s: float  # m micro-batches through the slowest stage
    bubble_s: float  # filling and draining
    transfers: int  # sends of one micro-batch's activations on the critical path (forward and backward)


def schedule(microbatches: int, pp: int, vpp: int | None, stage_s: list[float], overlap_p2p: bool) -> PipelineTime:
    """Busy time, bubble and exposed transfers of one step, given each stage's time per micro-batch."""
    v = vpp or 1
    busy = microbatches * max(stage_s)
    if pp <= 1:
        return PipelineTime(busy, 0.0, 0)
    bubble = (pp - 1) / v * sum(stage_s) / len(stage_s)
    # Blocking sends (plain 1F1B) sit on the path once per micro-batch each way; interleaved Megatron overlaps
    # its sends with compute, leaving the fill and drain ones.
    transfers = 2 * (pp - 1) * v if overlap_p2p else 2 * (microbatches + pp - 1)
    return PipelineTime(busy, bubble, transfers)
