"""An analytical model of a training step's time: compute at a sustained fraction of the device peak, the
pipeline bubble, and the communication volume of tensor, pipeline and data parallelism over given links.

Nothing overlaps in this model (a conservative bound); ring collectives move 2 (n-1)/n of the buffer per rank.
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

    @property
    def step_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_s

    def as_dict(self) -> dict:
        return {**asdict(self), "step_s": self.step_s}


def _ring_seconds(nbytes: float, ranks: int, bytes_per_s: float) -> float:
    """An all-reduce (or reduce-scatter + all-gather) of `nbytes` across `ranks` on a ring."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * nbytes / bytes_per_s


def predict(config: Config, cluster: Cluster, dp: int | None = None) -> Prediction:
    """Predicted step time of `config`'s model and layout on `cluster` (dp: what the devices leave by default)."""
    m, p, t = config.model, config.parallel, config.train
    dp = dp or cluster.devices // (p.tp * p.pp)
    act_bytes = 2 if t.precision == "bf16" else 4
    grad_bytes = 4  # megatron reduces gradients in fp32
    intra = cluster.intra_node_gbps * 1e9 / 8
    inter = cluster.inter_node_gbps * 1e9 / 8 / cluster.devices_per_node  # a node's NIC is shared
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

    # DP: this rank's gradients (a 1/(tp x pp) share of the model) all-reduced across the data-parallel ranks.
    grads = parameter_count(m) / (p.tp * p.pp) * grad_bytes
    dp_bw = intra if within_node else inter
    dp_time = _ring_seconds(grads, dp, dp_bw)
    return Prediction(compute_s=compute, bubble_s=bubble, tp_s=tp, pp_s=pp, dp_s=dp_time)
