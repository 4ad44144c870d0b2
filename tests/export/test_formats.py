"""The pure parts of the exports: re-layouts, the 7B's key names and shapes (meta device), config.json, and the
7B's params.yaml against Crystal's own yaml (crystal-spec §1.1, §3.2, §3.3)."""
from pathlib import Path

import pytest
import torch
import yaml

from megacrystal.config import load_config
from megacrystal.export import cerebras, hf, keys
from megacrystal.schedule.lr import lr_at

ROOT = Path(__file__).resolve().parents[2]

# crystal-spec §1.1, the `model:` block of all three phase yamls of LLM360/crystalcoder-train, verbatim.
CRYSTAL_MODEL = yaml.safe_load("""
attention_dropout_rate: 0.0
attention_kernel: optimized_beta
attention_softmax_fp32: true
attention_type: scaled_dot_product
boundary_casting: false
dropout_rate: 0.0
embedding_initializer: {a: -0.146, b: 0.146, mean: 0.0, name: truncated_normal, std: 0.073}
embeddings_scale: 14.6
filter_size: 10922
hidden_size: 4096
initializer: {a: -0.0365, b: 0.0365, mean: 0.0, name: truncated_normal, std: 0.01825}
layer_norm_epsilon: 1.0e-05
loss_scaling: batch_size
loss_weight: 0.00048828125        # 1/2048
max_position_embeddings: 2048
mixed_precision: true
nonlinearity: swiglu
num_heads: 32
num_hidden_layers: 32
output_layer_initializer: {a: -0.0045625, b: 0.0045625, mean: 0.0, name: truncated_normal, std: 0.00228125}
output_logits_scale: 0.13875
position_embedding_type: rotary
rotary_dim: 32
scale_glu_initialization: true
scale_qk_dot_by_d: true
share_embedding_weights: true
use_bfloat16: true
use_bias_in_output: false
use_ffn_bias: true
use_ffn_bias_in_attention: true
use_position_embedding: true
use_projection_bias_in_attention: true
vocab_size: 32032
weight_initialization_seed: 1
""")

# crystal-spec §3.3: the mixture weights of each phase, in the yaml's order.
CRYSTAL_WEIGHTS = [
    [0.043251179622600486, 0.0413121881861869, 0.2665010054745754, 0.5334581653397988, 0.04962588209760537,
     0.03168034115317788, 0.03417123812605512],
    [0.016083857723861224, 0.015358576352403003, 0.09909981505117808, 0.1983897689052003, 0.018454606218343703,
     0.011784941022274698, 0.012710859995188247, 0.6281175747315507],
    [0.08792775542527535, 0.18370762129027085, 0.18536747298179254, 0.34270089587947816, 0.016663255966286664,
     0.00831444671835677, 0.01685693658811707, 0.058282893778895735, 0.008379821974060706, 0.05835852419497722,
     0.0334403752024888],
]
# crystal-spec §3.3: phase 1 and 2 `learning_rate` verbatim; phase 3's values (its yaml writes steps / decay_steps).
CRYSTAL_LR = [
    yaml.safe_load("""
- {base_lr: 0.0, decay_steps: 86, end_learning_rate: 0.012, initial_learning_rate: 0.0, learning_rate: 0.0, scheduler: Linear, steps: 86}
- {base_lr: 0.012, decay_steps: 294337, end_learning_rate: 0.00012408, initial_learning_rate: 0.012, learning_rate: 0.012, scheduler: Linear, steps: 294337}
"""),
    yaml.safe_load("""
- {base_lr: 0.0, decay_steps: 86, end_learning_rate: 0.0087825, initial_learning_rate: 0.0, learning_rate: 0.0, scheduler: Linear, steps: 86}
- {base_lr: 0.0087825, decay_steps: 214301, end_learning_rate: 0.00013679, initial_learning_rate: 0.0087825, learning_rate: 0.0087825, scheduler: Linear, steps: 214301}
"""),
    [("Linear", 0.0, 0.002, 276), ("Linear", 0.002, 0.0002, 27452)],
]
MAX_STEPS = [79721, 214387, 27728]

# crystal-spec §1.1 [CCT-HF] config.json keys, verbatim.
CRYSTAL_HF_CONFIG = {
    "n_embd": 4096, "n_layer": 32, "n_head": 32, "n_inner": 10922, "n_positions": 2048, "vocab_size": 32032,
    "layer_norm_epsilon": 1e-05, "activation_function": "swiglu", "position_embedding_type": "rotary",
    "rotary_dim": 32, "tie_word_embeddings": True, "scale_attn_weights": True, "mup_scale_qk_dot_by_d": True,
    "mup_embeddings_scale": 14.6, "mup_output_alpha": 2.22, "mup_width_scale": 0.0625, "attn_pdrop": 0.0,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 2, "model_type": "crystalcoder",
    "architectures": ["CrystalCoderLMHeadModel"],
}


@pytest.fixture(scope="module")
def crystal_7b():
    return load_config(ROOT / "configs" / "crystal-7b.yaml")


# -- re-layouts ------------------------------------------------------------------------------------------------
def test_qkv_is_per_head_q_k_v_and_round_trips():
    nh, dh, h = 4, 3, 12
    q, k, v = (torch.randn(h, 5) for _ in range(3))
    qkv = keys.qkv_from_separate(q, k, v, nh)
    blocks = qkv.view(nh, 3, dh, 5)
    for head in range(nh):
        for j, x in enumerate((q, k, v)):
            assert torch.equal(blocks[head, j], x[head * dh:(head + 1) * dh])
    assert all(torch.equal(a, b) for a, b in zip(keys.qkv_to_separate(qkv, nh), (q, k, v)))
    bq, bk, bv = (torch.randn(h) for _ in range(3))
    assert all(torch.equal(a, b) for a, b in zip(keys.qkv_to_separate(keys.qkv_from_separate(bq, bk, bv, nh), nh),
                                                 (bq, bk, bv)))


def test_fc1_is_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = keys.fc1_from_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(keys.fc1_to_gate_up(fc1), (gate, up)))


# -- the 7B without allocating it ------------------------------------------------------------------------------
def _meta_global(m):
    return {n: torch.empty(s, device="meta") for n, s in keys.global_shapes(m).items()}


def test_7b_cs_key_names_and_shapes(crystal_7b):
    m = crystal_7b.model
    g = _meta_global(m)
    cs = {n: keys.cs_tensor(n, g.__getitem__, m.num_heads) for n in keys.cs_names(m.num_layers)}
    assert all(t.is_meta for t in cs.values())
    assert len(cs) == 582  # crystal-spec §4.3: the full 7B structure has 582 CS keys
    h, f, v = 4096, 10922, 32032
    table = {  # crystal-spec §4.2
        "self_attn.proj_q_dense_layer.weight": (h, h), "self_attn.proj_k_dense_layer.weight": (h, h),
        "self_attn.proj_v_dense_layer.weight": (h, h), "self_attn.proj_output_dense_layer.weight": (h, h),
        "norm1.weight": (h,), "norm3.weight": (h,), "ffn.ffn.0.linear_layer.weight": (f, h),
        "ffn.ffn.0.linear_layer_for_glu.weight": (f, h), "ffn.ffn.1.linear_layer.weight": (h, f),
        "ffn.ffn.0.linear_layer.bias": (f,), "ffn.ffn.0.linear_layer_for_glu.bias": (f,),
        "ffn.ffn.1.linear_layer.bias": (h,), "self_attn.proj_q_dense_layer.bias": (h,),
    }
    for i in (0, 31):
        for suffix, shape in table.items():
            assert tuple(cs[f"transformer_decoder.layers.{i}.{suffix}"].shape) == shape, suffix
    for name, shape in (("embedding_layer.word_embeddings.weight", (v, h)), ("lm_head.weight", (v, h)),
                        ("ln_f.weight", (h,)), ("ln_f.bias", (h,)), ("transformer_decoder.norm.bias", (h,))):
        assert tuple(cs[name].shape) == shape
    unique = sum(t.numel() for n, t in cs.items() if n not in keys.CS_ALIASES)
    assert unique == 6_575_278_720
    back = {n: keys.global_from_cs(n, cs.__getitem__, m.num_heads) for n in g}
    assert {n: tuple(t.shape) for n, t in back.items()} == keys.global_shapes(m)


def test_7b_hf_key_names_and_shapes_match_llm360s_release(crystal_7b):
    m = crystal_7b.model
    g = _meta_global(m)
    hf_sd = {n: keys.hf_tensor(n, g.__getitem__, m.num_heads) for n in keys.hf_names(m.num_layers)}
    assert all(t.is_meta for t in hf_sd.values())
    # LLM360's pytorch_model.bin.index.json, less the attn.bias / attn.masked_bias buffers.
    layer = ["attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias", "ln_1.weight",
             "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_fc2.weight",
             "mlp.c_fc2.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    released = {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"} | \
        {f"transformer.h.{i}.{n}" for i in range(32) for n in layer}
    assert set(hf_sd) == released
    shapes = {"attn.c_attn.weight": (4096, 12288), "attn.c_attn.bias": (12288,), "attn.c_proj.weight": (4096, 4096),
              "mlp.c_fc.weight": (4096, 10922), "mlp.c_fc2.weight": (4096, 10922), "mlp.c_proj.weight": (10922, 4096),
              "mlp.c_fc2.bias": (10922,), "ln_2.bias": (4096,)}
    for suffix, shape in shapes.items():
        assert tuple(hf_sd[f"transformer.h.7.{suffix}"].shape) == shape
        assert keys.hf_shape(f"transformer.h.7.{suffix}", m) == shape
    # lm_head duplicated: the fp32 weights take the release's bytes less its causal-mask buffers (§1.1).
    total = 4 * sum(t.numel() for t in hf_sd.values())
    assert total == 26_960_145_024 - 32 * 2048 * 2048 - 32 * 4
    back = {n: keys.global_from_hf(n, hf_sd.__getitem__, m.num_heads) for n in g}
    assert {n: tuple(t.shape) for n, t in back.items()} == keys.global_shapes(m)


def test_7b_config_json_is_llm360s(crystal_7b):
    config = hf.hf_config(crystal_7b.model)
    assert {k: config[k] for k in CRYSTAL_HF_CONFIG} == CRYSTAL_HF_CONFIG
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_crystalcoder.CrystalCoderLMHeadModel"
    assert hf.model_from_hf_config(config, "x")["output_logits_scale"] == crystal_7b.model.output_logits_scale


# -- the 7B's params.yaml ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, 2])
def test_7b_params_19_match_crystals_yaml(crystal_7b, index):
    p = cerebras.params_yaml(crystal_7b, index, "1.9")
    assert p["model"] == CRYSTAL_MODEL
    assert list(p["model"]) == list(CRYSTAL_MODEL)  # same keys, same order
    mix = p["train_input"]["mixture"]
    assert [e["weight"] for e in mix] == CRYSTAL_WEIGHTS[index]
    lr = p["optimizer"]["learning_rate"]
    expected = CRYSTAL_LR[index] if index == 2 else [
        (s["scheduler"], s["initial_learning_rate"], s["end_learning_rate"], s["steps"]) for s in CRYSTAL_LR[index]]
    assert [(s["scheduler"], s["initial_learning_rate"], s["end_learning_rate"], s["steps"]) for s in lr] == expected
    # each key once: Crystal's resolved yaml also repeats them as base_lr, learning_rate and decay_steps
    assert all(set(s) == {"scheduler", "initial_learning_rate", "end_learning_rate", "steps"} for s in lr)
    assert p["runconfig"]["max_steps"] == p["runconfig"]["num_steps"] == MAX_STEPS[index]  # a phase on its own
    assert p["runconfig"]["is_pretrained_checkpoint"] is (index == 2)
    o = p["optimizer"]
    assert (o["optimizer_type"], o["beta1"], o["beta2"], o["eps"], o["weight_decay_rate"], o["max_gradient_norm"],
            o["correct_bias"]) == ("AdamW", 0.9, 0.95, 1e-9, 0.1, 1.0, True)
    assert o["adjust_learning_rate"] == {"decoder_kernel": 0.0625}
    t = p["train_input"]
    assert (t["batch_size"], t["vocab_size"], t["data_processor"], t["shuffle_seed"]) == \
        (2112, 32032, "GptHDF5MapDataProcessor", 1)


def test_7b_params_2x_use_mup_base_dimensions(crystal_7b):
    p = cerebras.params_yaml(crystal_7b, 1, "2.x")
    m = p["trainer"]["init"]["model"]
    # crystal-spec §4.1: CrystalCoder in 2.3+ terms.
    assert (m["mup_base_hidden_size"], m["mup_base_filter_size"], m["output_logits_alpha"]) == (256, 682.625, 2.22)
    assert m["scale_output_logits_by_d"] and m["scale_qk_dot_by_d"] and m["embeddings_scale"] == 14.6
    for key in ("embedding_initializer", "initializer", "output_layer_initializer"):
        assert m[key] == {"a": -0.146, "b": 0.146, "mean": 0.0, "name": "truncated_normal", "std": 0.073}, key
    assert "output_logits_scale" not in m and "adjust_learning_rate" not in str(p)
    (seq,) = p["trainer"]["init"]["schedulers"]
    assert seq["SequentialLR"]["schedulers"] == [
        {"LinearLR": {"initial_learning_rate": 0.0, "end_learning_rate": 0.0087825, "total_iters": 86}},
        {"LinearLR": {"initial_learning_rate": 0.0087825, "end_learning_rate": 0.00013679, "total_iters": 214301}}]
    assert [e["weight"] for e in p["trainer"]["fit"]["train_dataloader"]["mixture"]] == CRYSTAL_WEIGHTS[1]
    assert p["trainer"]["init"]["loop"]["max_steps"] == MAX_STEPS[1]


def _lr_of(pieces, t):
    for kind, a, b, n in pieces:
        if t < n or kind == "constant":
            return a + (b - a) * min(t, n) / n if kind != "constant" else a
        t -= n
    return pieces[-1][2]


@pytest.mark.parametrize("offset", [0, 40, 86, 5000, 79720])
def test_resumed_lr_pieces_continue_the_phase_schedule(crystal_7b, offset):
    from megacrystal.schedule.from_config import plan_for

    plan = plan_for(crystal_7b)
    seg, steps = plan.phases[0].lr, plan.steps[0]
    pieces = cerebras.lr_pieces(seg, steps, offset)
    for t in sorted({0, 1, 45, 46, 85 - min(offset, 85), 86, 1000, steps - offset - 1}):
        if 0 <= t < steps - offset:
            assert _lr_of(pieces, t) == pytest.approx(lr_at(seg, offset + t, steps), rel=1e-12, abs=1e-15)


def test_unknown_cs_release_is_a_config_error():
    from megacrystal.config import ConfigError

    with pytest.raises(ConfigError, match="unknown Cerebras release"):
        cerebras.release("3.0")


def test_a_phase_with_online_mixing_has_no_cerebras_export():
    from megacrystal.config import ConfigError

    config = load_config(ROOT / "configs" / "crystal-tiny.yaml", ["data.phases.mixed.mixing.mode=online"])
    assert cerebras.params_yaml(config, 2, "1.9")["train_input"]["mixture"]  # a fixed phase still exports
    with pytest.raises(ConfigError, match=r"^data.phases.mixed.mixing: Model Zoo's data mixture is fixed"):
        cerebras.params_yaml(config, 1, "1.9")


@pytest.mark.parametrize("step, resume", [(150, False), (200, True), (400, False)])
def test_cerebras_export_continues_from_the_checkpoints_step(tmp_path, step, resume):
    """crystal-tiny: phases text (150 steps), mixed (150), code (100). A checkpoint at a phase boundary starts the
    next phase; one mid-phase gets a params.yaml for the rest of its phase; the run's end gets no command."""
    config = load_config(ROOT / "configs" / "crystal-tiny.yaml")
    weights = {n: torch.randn(s) for n, s in keys.global_shapes(config.model).items()}
    lines = cerebras.export_cerebras(config, tmp_path, "1.9", weights=weights, step=step)
    mdl = tmp_path / f"checkpoint_{step}.mdl"
    assert set(torch.load(mdl, weights_only=True)["model"]) == set(keys.cs_names(config.model.num_layers))
    commands = [line for line in lines if "run.py CSX" in line]
    assert (tmp_path / "mixed-resume" / "params.yaml").is_file() is resume
    if step == 400:
        assert not commands and any("ends the run's last phase" in line for line in lines)
        return
    first = yaml.safe_load((tmp_path / ("mixed-resume" if resume else "mixed") / "params.yaml").read_text())
    assert first["runconfig"]["is_pretrained_checkpoint"] is True  # weights only: no CS optimizer state
    assert first["runconfig"]["max_steps"] == (100 if resume else 150)
    assert f"--checkpoint_path {mdl}" in commands[0] and "mixed" in commands[0]
    assert f"--checkpoint_path model_dir/mixed/checkpoint_{100 if resume else 150}.mdl" in commands[1]
    if resume:  # the LR continues where the trained phase left it
        from megacrystal.schedule.from_config import plan_for

        seg = first["optimizer"]["learning_rate"][0]
        assert seg["initial_learning_rate"] == pytest.approx(lr_at(plan_for(config).phases[1].lr, 50, 150))


@pytest.mark.parametrize("convert, name, kind", [
    (keys.cs_tensor, "transformer_decoder.layers.0.norm1", "CS Crystal key"),
    (keys.hf_tensor, "transformer.h.0.ln_1.scale", "CrystalCoder HF key"),
    (keys.global_from_cs, "decoder.layers.x.mlp.linear_fc1.weight", "megacrystal parameter"),
])
def test_a_key_of_no_layer_parameter_is_a_key_error_naming_its_kind(convert, name, kind):
    with pytest.raises(KeyError, match=f"not a {kind}: {name}"):
        convert(name, lambda n: torch.zeros(1), 1)


@pytest.mark.parametrize("layout", ["1.9", "2.x"])
def test_cerebras_phase_chain_of_the_3_phase_7b(tmp_path, crystal_7b, layout):
    """Each phase continues from the previous one's last Model Zoo checkpoint, named by its global step; a phase
    with optimizer state counts global steps on from there (cumulative max_steps, LR pieces after them), a
    weights-only one (is_pretrained_checkpoint) from 0 (crystal-spec 3.2: Model Zoo 1.9 restores global_step
    unless is_pretrained_checkpoint, and trains until global_step == max_steps)."""
    from megacrystal.schedule.from_config import plan_for

    plan = plan_for(crystal_7b)
    cerebras.export_cerebras(crystal_7b, tmp_path, layout)
    chain = []
    for phase in plan.phases:
        p = yaml.safe_load((tmp_path / phase.name / "params.yaml").read_text())
        if layout == "1.9":
            r = p["runconfig"]
            ckpt, pretrained = r.get("checkpoint_path"), r["is_pretrained_checkpoint"]
            lr = p["optimizer"]["learning_rate"]
            steps = [s.get("steps", s.get("decay_steps")) for s in lr]
        else:
            r = p["trainer"]["init"]["loop"]
            ckpt, pretrained = p["trainer"]["fit"].get("ckpt_path"), phase.weights_only_start
            steps = [next(iter(s.values()))["total_iters"] for s in
                     p["trainer"]["init"]["schedulers"][0]["SequentialLR"]["schedulers"]]
        chain.append((ckpt, pretrained, r["num_steps"], r["max_steps"], steps))
    assert [c[2] for c in chain] == list(plan.steps) == MAX_STEPS  # each phase's own steps
    assert chain[0][0] is None and chain[0][3] == MAX_STEPS[0]
    for i in range(1, len(chain)):
        prev_max, (ckpt, pretrained, num, max_steps, steps), phase = chain[i - 1][3], chain[i], plan.phases[i]
        assert ckpt == f"model_dir/{plan.phases[i - 1].name}/checkpoint_{prev_max}.mdl"
        assert pretrained is phase.weights_only_start
        start = 0 if phase.weights_only_start else prev_max
        assert max_steps == start + num
        if start:  # the restored LR scheduler step: a constant piece over the steps before this phase
            assert steps[0] == start
        assert sum(steps) >= max_steps
    assert [c[3] for c in chain] == [79721, 79721 + 214387, 27728]
