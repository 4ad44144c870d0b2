"""Communication: tensor (and sequence) parallel collectives, pipeline sends, data-parallel gradient and
parameter collectives, on the link each group actually uses.

Ranks are laid out as Megatron does (tensor parallel innermost, then data parallel, then pipeline), so a group
stays inside a node while its span does: TP while tp <= devices per node, DP while tp x dp is, PP while the
whole model-and-data grid is. Collectives are rings: an all-reduce passes 2 (n-1)/n of the buffer through
every rank, a reduce-scatter or an all-gather (n-1)/n; each costs one latency on top.
"""
from __future__ import annotations

from .hardware import Cluster, Constants
from .shapes import Layout, Shape


def _bytes_per_s(cluster: Cluster, c: Constants, span: int, stride: int = 1) -> float:
    """Payload bandwidth of a ring whose members are `stride` ranks apart and span `span` consecutive ranks.

    Inside a node: NVLink. Across nodes only the hops between nodes use the network, so a ring with k members in
    each node moves one member's volume through the node's NICs while the `stride` rings beside it share them:
    k NICs' worth per ring (NCCL spreads its channels over the NICs), at most the intra-node link.
    """
    intra = cluster.intra_gbytes_s * 1e9 * c.intra_link_efficiency
    if span <= cluster.devices_per_node:
        return intra
    members_per_node = max(1, cluster.devices_per_node // stride)
    return min(intra, members_per_node * cluster.inter_gbits_s_per_device * 1e9 / 8 * c.inter_link_efficiency)


def ring_seconds(nbytes: float, ranks: int, passes: float, bytes_per_s: float, c: Constants) -> float:
    """`passes` ring phases (1: reduce-scatter or all-gather, 2: all-reduce) of an nbytes buffer over `ranks`."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return passes * (ranks - 1) / ranks * nbytes / bytes_per_s + c.collective_latency_s


def tp_layer_seconds(shape: Shape, layout: Layout, cluster: Cluster, c: Constants) -> tuple[float, float]:
    """TP collectives of one layer and micro-batch, forward and backward, after any overlap with GEMMs.

    Without SP: two all-reduces of the [s, b, h] activations forward, two of their gradients backward. With SP
    (Korthikanti et al. 2022, section 4.2.2) each becomes an all-gather plus a reduce-scatter of the same volume,
    and backward all-gathers the two sharded inputs once more for the weight gradients.
    """
    if layout.tp <= 1:
        return 0.0, 0.0
    nbytes = layout.micro_batch * shape.seq * shape.hidden * shape.bytes_per_value
    bw = _bytes_per_s(cluster, c, layout.tp)
    pair = 2 * ring_seconds(nbytes, layout.tp, 1, bw, c) if layout.sp else ring_seconds(nbytes, layout.tp, 2, bw, c)
    fwd, bwd = 2 * pair, 2 * pair
    if layout.sp:
        bwd += 2 * ring_seconds(nbytes, layout.tp, 1, bw, c)
    if layout.recompute == "full":
        bwd += fwd
    if layout.tp_comm_overlap:
        fwd, bwd = fwd * (1 - c.tp_comm_overlap), bwd * (1 - c.tp_comm_overlap)
    return fwd, bwd


def pp_transfer_seconds(shape: Shape, layout: Layout, cluster: Cluster, c: Constants) -> float:
    """One micro-batch's activations (or their gradients) sent across one pipeline stage boundary."""
    if layout.pp <= 1:
        return 0.0
    nbytes = layout.micro_batch * shape.seq * shape.hidden * shape.bytes_per_value / (layout.tp if layout.sp else 1)
    span = layout.tp * layout.dp * layout.pp
    return nbytes / _bytes_per_s(cluster, c, span, stride=layout.tp * layout.dp) + c.collective_latency_s


def dp_seconds(params_rank: float, shape: Shape, layout: Layout, cluster: Cluster,
               c: Constants) -> tuple[float, float]:
    """(gradient reduction, parameter gather) seconds of one step for this rank's `params_rank` parameters.

    Without sharding: one all-reduce of the gradients. Megatron's distributed optimizer and ZeRO-1/2: a
    reduce-scatter of the gradients, then an all-gather of the updated parameters in their own dtype. ZeRO-3
    all-gathers the parameters in forward and again in backward instead.
    """
    d = layout.dp
    if d <= 1:
        return 0.0, 0.0
    bw = _bytes_per_s(cluster, c, layout.tp * d, stride=layout.tp)
    grads = params_rank * layout.grad_reduce_bytes
    params = params_rank * shape.bytes_per_value
    if layout.zero_stage == 3:
        return ring_seconds(grads, d, 1, bw, c), 2 * ring_seconds(params, d, 1, bw, c)
    if layout.distributed_optimizer or layout.zero_stage:
        return ring_seconds(grads, d, 1, bw, c), ring_seconds(params, d, 1, bw, c)
    return ring_seconds(grads, d, 2, bw, c), 0.0


def buckets(params_rank: float, dp: int) -> int:
    """Gradient buckets Megatron's DDP makes (max(40M, 1M x dp) parameters each): overlap hides all but the last."""
    return max(1, round(params_rank / max(40e6, 1e6 * dp)))
