"""The run schema: exact Crystal values, dotted overrides, and one-line errors that name the field."""
from pathlib import Path

import pytest

from megacrystal.config import ConfigError, config_from_dict, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "crystal-tiny.yaml"


def test_crystal_7b_values_are_the_spec():
    c = load_config(CONFIGS / "crystal-7b.yaml")
    m, o = c.model, c.optim
    assert (m.num_layers, m.hidden_size, m.num_heads, m.ffn_hidden_size, m.vocab_size, m.seq_length) == \
        (32, 4096, 32, 10922, 32032, 2048)
    assert (m.head_dim, m.rotary_dim, m.rotary_base, m.rotary_interleaved) == (128, 32, 10000, True)
    assert (m.embeddings_scale, m.output_logits_scale, m.mup_width_scale) == (14.6, 0.13875, 0.0625)
    assert (m.init.embedding_std, m.init.hidden_std, m.init.output_std) == (0.073, 0.01825, 0.00228125)
    assert (o.betas, o.eps, o.weight_decay, o.clip_grad) == ((0.9, 0.95), 1e-9, 0.1, 1.0)
    assert c.train.global_batch_size == 2112 and m.layernorm_eps == 1e-5


def test_overrides_set_nested_typed_values():
    c = load_config(TINY, ["parallel.tp=2", "parallel.sp=true", "optim.lr=3e-4", "run.name=abc"])
    assert (c.parallel.tp, c.parallel.sp, c.optim.lr, c.run.name) == (2, True, 3e-4, "abc")
    assert c.run_dir() == "runs/abc"


def test_resolved_config_round_trips(tmp_path):
    c = load_config(TINY, ["parallel.pp=2"])
    (tmp_path / "c.yaml").write_text(dump_config(c))
    assert load_config(tmp_path / "c.yaml") == c


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tpp=2"], "parallel.tpp: unknown key"),
    (["model.bogus.x=1"], "model.bogus: unknown key"),
    (["model.num_heads=abc"], "model.num_heads: input should be a valid integer"),
    (["train.steps=0"], "train.steps: input should be greater than 0"),
    (["model.num_heads=5"], "model.num_heads: 5 does not divide model.hidden_size (128)"),
    (["parallel.tp=8"], "parallel.tp: 8 does not divide model.num_heads (4)"),
    (["parallel.pp=3"], "parallel.pp: pp x vpp = 3 does not divide model.num_layers (4)"),
    (["parallel.pp=2", "parallel.vpp=4"], "parallel.pp: pp x vpp = 8 does not divide model.num_layers (4)"),
    (["parallel.vpp=2"], "parallel.vpp: virtual stages need parallel.pp > 1"),
    (["parallel.sp=true"], "parallel.sp: sequence parallelism needs parallel.tp > 1"),
    (["train.profile_steps=[5,2]"], "train.profile_steps: [5, 2] must be [first, last]"),
    (["engine=deepspeed", "train.compile=true"], "train.compile: only with engine: megatron"),
    (["model.rotary_percent=0.3"], "model.rotary_percent"),
    (["parallel.tp"], "--set 'parallel.tp': expected key=value"),
    (["model.num_layers.x=1"], "--set model.num_layers.x: model.num_layers is a value, not a section"),
])
def test_bad_values_raise_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_size_must_fit_the_layout():
    c = load_config(TINY, ["parallel.tp=2"])
    assert c.data_parallel_size(4) == 2
    with pytest.raises(ConfigError, match=r"parallel: world size 3 is not divisible by tp x pp = 2"):
        c.data_parallel_size(3)
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 16 is not a multiple of .* = 12"):
        load_config(TINY, ["train.micro_batch_size=4"]).data_parallel_size(3)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="model: required but missing"):
        config_from_dict({"optim": {"lr": 1}, "train": {"steps": 1, "global_batch_size": 1}})


def test_crystal_7b_three_phases_and_lr_segments():
    from megacrystal.schedule.from_config import plan_for

    plan = plan_for(load_config(CONFIGS / "crystal-7b.yaml"))
    assert list(plan.steps) == [79_721, 214_387, 27_728]
    start2, start3 = 79_721, 79_721 + 214_387
    assert plan.lr_at_step(86) == pytest.approx(0.012)
    assert plan.lr_at_step(start2 - 1) == pytest.approx(0.0087869, rel=1e-4)  # phase 1 stops mid-decay
    assert plan.lr_at_step(start2 + 86) == pytest.approx(0.0087825)  # phase 2 re-warms to where phase 1 stopped
    assert plan.lr_at_step(start3 + 276) == pytest.approx(0.002)
    assert plan.phases[1].fim_rate == 0.9 and plan.phases[2].fim_rate == 0.3 and plan.phases[2].weights_only_start
    assert plan.phases[1].weights["starcoder"] == pytest.approx(0.6281175747315507)


def test_flops_per_token_of_the_7b_by_hand():
    from megacrystal.model.size import flops_per_token, matmul_parameters

    m = load_config(CONFIGS / "crystal-7b.yaml").model
    h, f, layers, vocab, seq = 4096, 10922, 32, 32032, 2048
    per_layer = h * 3 * h + h * h + 2 * h * f + f * h  # qkv, proj, fc1 (gate and up), fc2
    assert matmul_parameters(m) == layers * per_layer == 6_442_188_800
    # 6 FLOPs per matmul weight per token (forward 2, backward 4), the tied output projection once,
    # and QK^T plus AV: 2 x 2 x S x h per layer forward, x 3 with backward.
    expected = 6 * layers * per_layer + 6 * vocab * h + 12 * layers * h * seq
    assert flops_per_token(m) == expected == 42_661_576_704
