"""The throughput model (bench/perf) against hand-derived formulas: FLOPs, Korthikanti et al. 2022's activation
memory, Megatron's distributed-optimizer bytes, the 1F1B and interleaved bubbles, ring volumes and overlap."""
import dataclasses
from pathlib import Path

import pytest

from megacrystal.bench.perf.comm import dp_seconds, tp_layer_seconds
from megacrystal.bench.perf.hardware import Cluster, Constants, default_constants, device
from megacrystal.bench.perf.memory import layer_activation_bytes, memory, stage_parameters
from megacrystal.bench.perf.pipeline import schedule
from megacrystal.bench.perf.shapes import Layout, Shape
from megacrystal.bench.perf.step import estimate
from megacrystal.config import load_config
from megacrystal.model.size import flops_per_token, parameter_count

ROOT = Path(__file__).resolve().parents[2]
# GPT as Korthikanti et al. 2022 model it: 4h GELU MLP, dropout, unfused attention, 2-byte activations
GPT = Shape(layers=24, hidden=2048, heads=16, ffn=8192, vocab=51200, seq=2048, swiglu=False, dropout=True,
            flash_attention=False)
H100 = device("H100 SXM")


def _layout(**kw) -> Layout:
    base = dict(tp=1, pp=1, dp=1, micro_batch=1, global_batch=64, sp=False, recompute="none")
    return Layout(**{**base, **kw})


def test_crystal_shape_matches_the_model_size_module():
    config = load_config(ROOT / "configs" / "crystal-7b.yaml")
    shape = Shape.of(config.model)
    assert shape.model_flops_per_token() == flops_per_token(config.model)
    # biases are left out of the shape's count: within 0.05% of the exact parameter count
    assert shape.parameters() == pytest.approx(parameter_count(config.model), rel=5e-4)


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activation_memory_follows_korthikanti_2022(t):
    s, b, h, a = GPT.seq, 2, GPT.hidden, GPT.heads
    sbh = s * b * h
    plain = layer_activation_bytes(GPT, _layout(tp=t, micro_batch=b))
    assert plain == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))  # their eq. for TP without SP
    if t > 1:
        sp = layer_activation_bytes(GPT, _layout(tp=t, micro_batch=b, sp=True))
        assert sp == pytest.approx(sbh / t * (34 + 5 * a * s / h))
        selective = layer_activation_bytes(GPT, _layout(tp=t, micro_batch=b, sp=True, recompute="selective"))
        assert selective == pytest.approx(sbh / t * 34)
    assert layer_activation_bytes(GPT, _layout(tp=t, micro_batch=b, recompute="full")) == pytest.approx(2 * sbh)


def test_first_stage_holds_L_layers_of_activations_and_interleaving_adds_its_share():
    layout = _layout(tp=8, pp=4, dp=1, global_batch=64, sp=True)
    per_layer = layer_activation_bytes(GPT, layout)
    assert memory(GPT, layout, 80).activations == pytest.approx(GPT.layers * per_layer)
    interleaved = memory(GPT, layout.with_(vpp=2), 80).activations
    assert interleaved == pytest.approx(GPT.layers * per_layer * (1 + 3 / 8))


def test_optimizer_bytes_per_parameter():
    params = stage_parameters(GPT, _layout())
    plain = memory(GPT, _layout(dp=8, distributed_optimizer=False), 80)
    assert plain.weights + plain.gradients + plain.optimizer == pytest.approx(18 * params)  # 2 + 4 + 12
    distopt = memory(GPT, _layout(dp=8, distributed_optimizer=True), 80)
    assert distopt.weights + distopt.gradients + distopt.optimizer == pytest.approx((6 + 12 / 8) * params)
    zero3 = memory(GPT, _layout(dp=8, distributed_optimizer=False, zero_stage=3), 80)
    assert zero3.weights + zero3.gradients + zero3.optimizer == pytest.approx(16 / 8 * params)  # ZeRO paper


def test_bubble_of_1f1b_and_interleaved():
    plain = schedule(16, 4, None, [1.0] * 4, overlap_p2p=False)
    assert (plain.busy_s, plain.bubble_s) == (16.0, 3.0)  # (m + p - 1) slots
    interleaved = schedule(16, 4, 3, [1.0] * 4, overlap_p2p=True)
    assert interleaved.bubble_s == pytest.approx(1.0)  # (p - 1) / v
    assert schedule(16, 1, None, [2.0], False).bubble_s == 0


def test_dp_volumes_and_links_by_hand():
    c = Constants(inter_link_efficiency=1.0, intra_link_efficiency=1.0, collective_latency_s=0.0)
    cluster = Cluster(H100, nodes=4, devices_per_node=8, intra_gbytes_s=450, inter_gbits_s_per_device=400)
    params = 1e9
    # tp 8: each DP ring has one member per node, so it gets one NIC: 50 GB/s
    grads, gather = dp_seconds(params, GPT, _layout(tp=8, dp=4, distributed_optimizer=False), cluster, c)
    assert grads == pytest.approx(2 * 3 / 4 * params * 4 / 50e9) and gather == 0
    grads, gather = dp_seconds(params, GPT, _layout(tp=8, dp=4), cluster, c)
    assert grads == pytest.approx(3 / 4 * params * 4 / 50e9) and gather == pytest.approx(3 / 4 * params * 2 / 50e9)
    # tp 2: four members of each ring share a node, so its inter-node hops carry 4 NICs' worth
    grads, _ = dp_seconds(params, GPT, _layout(tp=2, dp=16), cluster, c)
    assert grads == pytest.approx(15 / 16 * params * 4 / 200e9)
    # inside one node: NVLink
    grads, _ = dp_seconds(params, GPT, _layout(tp=2, dp=4), cluster, c)
    assert grads == pytest.approx(3 / 4 * params * 4 / 450e9)


def test_tp_collectives_same_volume_with_sp_plus_the_backward_gathers():
    c = Constants(intra_link_efficiency=1.0, collective_latency_s=0.0)
    cluster = Cluster(H100, 1, 8, 450, 400)
    nbytes = 2048 * 2048 * 2
    fwd, bwd = tp_layer_seconds(GPT, _layout(tp=8), cluster, c)
    assert fwd == bwd == pytest.approx(2 * 2 * 7 / 8 * nbytes / 450e9)  # two all-reduces each way
    fwd_sp, bwd_sp = tp_layer_seconds(GPT, _layout(tp=8, sp=True), cluster, c)
    assert fwd_sp == pytest.approx(fwd) and bwd_sp == pytest.approx(bwd + 2 * 7 / 8 * nbytes / 450e9)


def test_recomputation_trades_time_for_memory_and_overlap_hides_dp():
    cluster = Cluster(H100, 4, 8, 450, 400)
    c = default_constants("H100 SXM")
    layout = _layout(tp=2, dp=16, micro_batch=1, global_batch=256, sp=True, overlap_grad_reduce=False,
                     overlap_param_gather=False)
    runs = {r: estimate(GPT, layout.with_(recompute=r), cluster, c) for r in ("none", "selective", "full")}
    assert runs["none"].step_s < runs["selective"].step_s < runs["full"].step_s
    assert runs["none"].memory.activations > runs["selective"].memory.activations > runs["full"].memory.activations
    overlapped = estimate(GPT, layout.with_(overlap_grad_reduce=True, overlap_param_gather=True), cluster, c)
    assert overlapped.dp_s < runs["none"].dp_s and overlapped.step_s < runs["none"].step_s
    # full recomputation: backward = 3 forward GEMM passes, so the GEMM time is 4/3 of none's
    assert runs["full"].gemm_s == pytest.approx(4 / 3 * runs["none"].gemm_s)
    for est in runs.values():  # the compute term is its parts
        assert est.compute_s == pytest.approx(est.gemm_s + est.attention_s + est.elementwise_s + est.output_layer_s)


def test_a_layout_that_does_not_fit_is_marked():
    big = dataclasses.replace(GPT, layers=96, hidden=12288, heads=96, ffn=4 * 12288)
    est = estimate(big, _layout(global_batch=8), Cluster(H100, 1, 1, 450, 400), default_constants("H100 SXM"))
    assert not est.memory.fits and est.memory.total > 80e9
