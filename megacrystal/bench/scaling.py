"""The simple step-time model `bench --link-rates` checks on a throttled link: compute at one sustained fraction
of the device peak, the pipeline bubble, and the communication volume of tensor, pipeline and data parallelism.
`--predict` and `--plan` use the fuller model in bench/perf/ (GEMM shapes, overlap, memory, recomputation).

Nothing overlaps in this model (a conservative bound); ring collectives move 2 (n-1)/n of the buffer per rank.
Link speeds are raw bits per second; `Cluster.inter_node_payload_fraction` is the share of them that is payload
(headers and acknowledgements take the rest: see `tcp_payload_fraction`). `megacrystal bench --link-rates`
checks the DP term against two namespace hosts on a link throttled by `tc tbf` (bench/network.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import Config
from ..model.size import flops_per_token, parameter_count


@dataclass(frozen=True)
class Cluster:
    """What the step runs on: devices, their dense peak, and the two link speeds (bytes/s per device)."""

    nodes: int
    devices_per_node: int
    peak_tflops: float  # dense, per device, at the run's precision
    intra_node_gbps: float  # per-device bandwidth inside a node (e.g. NVLink), gigabits/s
    inter_node_gbps: float  # per-node network bandwidth, gigabits/s (shared by the node's devices)
    efficiency: float = 0.5  # sustained fraction of peak for the matmuls
    # Payload share of the inter-node link's bits. 1.0 ignores framing (InfiniBand/RoCE with 4 KB frames lose
    # ~2%); TCP over 1500-byte Ethernet (gloo, NCCL's socket transport): tcp_payload_fraction(), ~0.94.
    inter_node_payload_fraction: float = 1.0

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class Prediction:
    compute_s: float
    bubble_s: float
    tp_s: float
    pp_s: float
    dp_s: float
    dp_bytes: float = 0.0  # payload each rank sends per step for data parallelism (and receives as much)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_s

    def as_dict(self) -> dict:
        return {**asdict(self), "step_s": self.step_s}


# Header bytes of one TCP segment on Ethernet as a qdisc (tbf) or a NIC's byte counters see it: the 14-byte
# Ethernet header (no preamble, FCS or inter-frame gap on a veth), IPv4 20, TCP 20 + 12 of timestamp option
# (Linux sends it by default). A 1500-byte MTU leaves a 1448-byte payload (MSS) per 1514-byte frame.
ETHERNET_HEADER, IPV4_HEADER, TCP_HEADER = 14, 20, 32


def tcp_payload_fraction(mtu: int = 1500, segments_per_ack: int = 2) -> float:
    """Payload share of one direction of a TCP link whose two directions carry the same bytes at once.

    A ring all-reduce is such a flow: every rank sends as much as it receives, so each direction carries full
    data frames plus the acknowledgements of the data coming the other way. Linux acknowledges every second
    full segment (RFC 1122/5681) with a header-only frame; ACKs that ride on data cost nothing, so with
    `segments_per_ack=2` this is the low end (measured on a veth: ~1 pure ACK per 3 segments).
    """
    mss = mtu - IPV4_HEADER - TCP_HEADER
    frame = mtu + ETHERNET_HEADER
    ack = ETHERNET_HEADER + IPV4_HEADER + TCP_HEADER
    return mss / (frame + ack / segments_per_ack)


def dp_bytes_per_rank(config: Config, dp: int) -> float:
    """Payload bytes one data-parallel rank sends (and receives) per step to synchronise gradients.

    The megatron engine's DDP (engines/megatron.py: grad_reduce_in_fp32=True, overlap_grad_reduce=False) keeps
    this rank's gradients in one fp32 buffer per dtype (a single bucket when nothing overlaps) and, after the
    last micro-batch, either
      - all-reduces it (torch.distributed.all_reduce; gloo and NCCL run a ring: a reduce-scatter then an
        all-gather, each passing (n-1)/n of the buffer through every rank), or
      - with the distributed optimizer, reduce-scatters the fp32 gradients and, after the optimizer step,
        all-gathers the updated parameters in their own dtype (bf16 under bf16): (n-1)/n x (4 + 2 or 4) bytes.
    The other collectives of a step (token count, loss, stop flag) are a few scalars: their bytes are nothing and
    their latency (tens of microseconds per collective on a local link) is left out.
    """
    if dp <= 1:
        return 0.0
    m, p, t = config.model, config.parallel, config.train
    params = parameter_count(m) / (p.tp * p.pp)  # this rank's share of the model
    share = (dp - 1) / dp
    grad_bytes = 4  # megatron reduces gradients in fp32 (grad_reduce_in_fp32)
    if p.distributed_optimizer:
        param_bytes = 2 if t.precision == "bf16" else 4
        return share * params * (grad_bytes + param_bytes)
    return 2 * share * params * grad_bytes


def _ring_seconds(nbytes: float, ranks: int, bytes_per_s: float) -> float:
    """An all-reduce (or reduce-scatter + all-gather) of `nbytes` across `ranks` on a ring."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * nbytes / bytes_per_s


def predict(config: Config, cluster: Cluster, dp: int | None = None) -> Prediction:
    """Predicted step time of `config`'s model and layout on `cluster` (dp: what the devices leave by default)."""
    m, p, t = config.model, config.parallel, config.train
    dp = dp or cluster.devices // (p.tp * p.pp)
    act_bytes = 2 if t.precision == "bf16" else 4
    intra = cluster.intra_node_gbps * 1e9 / 8
    # payload bytes/s: a node's NIC is shared by its devices, and framing takes its share of the bits
    inter = cluster.inter_node_gbps * 1e9 / 8 * cluster.inter_node_payload_fraction / cluster.devices_per_node
    within_node = p.tp * p.pp * dp <= cluster.devices_per_node

    tokens = t.global_batch_size * m.seq_length
    compute = flops_per_token(m) * tokens / (cluster.devices * cluster.peak_tflops * 1e12 * cluster.efficiency)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    bubble = compute * (p.pp - 1) / (microbatches * (p.vpp or 1)) if p.pp > 1 else 0.0

    # TP: per layer and micro-batch, two all-reduces of the activations forward and two backward (SP turns
    # them into reduce-scatter + all-gather pairs of the same volume). TP stays inside a node.
    activation = t.micro_batch_size * m.seq_length * m.hidden_size * act_bytes
    layers_per_rank = m.num_layers // p.pp
    tp_bw = intra if p.tp <= cluster.devices_per_node else inter
    tp = microbatches * layers_per_rank * 4 * _ring_seconds(activation, p.tp, tp_bw)

    # PP: each micro-batch crosses every stage boundary forward (activations) and backward (their gradients).
    pp_bw = intra if within_node else inter
    pp = microbatches * 2 * (activation / (p.tp if p.sp else 1)) / pp_bw if p.pp > 1 else 0.0

    # DP: this rank's gradients (a 1/(tp x pp) share of the model) synchronised across the data-parallel ranks;
    # sending and receiving overlap (full-duplex links), so the time is what one rank sends.
    dp_bytes = dp_bytes_per_rank(config, dp)
    dp_bw = intra if within_node else inter
    return Prediction(compute_s=compute, bubble_s=bubble, tp_s=tp, pp_s=pp, dp_s=dp_bytes / dp_bw,
                      dp_bytes=dp_bytes)
