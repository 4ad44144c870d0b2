"""The kernel choice for every combination of importable optional packages and device.

Transformer Engine, apex (and its fused_weight_gradient_mlp_cuda extension) and flash-attn cannot be installed on
this CPU machine, so stub modules in sys.modules stand in for them: what is tested is the selection logic (which
reads only whether a package imports and its version), against rules written out here from megatron-core 0.16's
own requirements (see kernels/select.py for where each comes from).
"""
import itertools
import sys
import types
from pathlib import Path

import pytest
import yaml

from megacrystal.config.schema import KernelsSection
from megacrystal.kernels import select
from megacrystal.kernels.select import OPTIONAL_PACKAGES, announce, select_kernels

TODAYS_CPU_FLAGS = dict(bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
                        cross_entropy_loss_fusion=False)
SWITCHES = list(KernelsSection.model_fields)


def _stub(monkeypatch, present: dict) -> None:
    """Make exactly the packages in `present` ({name: version string or None}) importable."""
    for name in OPTIONAL_PACKAGES:
        if name in present:
            module = types.ModuleType(name)
            if present[name] is not None:
                module.__version__ = present[name]
            monkeypatch.setitem(sys.modules, name, module)
        else:
            monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


COMBINATIONS = [frozenset(c) for n in range(len(OPTIONAL_PACKAGES) + 1)
                for c in itertools.combinations(OPTIONAL_PACKAGES, n)]


def _ids(combo):
    return "+".join(sorted(combo)) or "none"


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_ids)
def test_cpu_choice_is_todays_whatever_imports(monkeypatch, combo):
    _stub(monkeypatch, {name: "2.5.0" for name in combo})
    choice = select_kernels(KernelsSection(), "cpu")
    assert (choice.layer_spec, choice.attention, choice.rotary, choice.swiglu, choice.vocab, choice.cross_entropy,
            choice.layernorm, choice.adam) == ("local", "crystal-cpu", "crystal", "crystal", "crystal", "crystal",
                                               "torch", "torch")
    assert choice.flags == TODAYS_CPU_FLAGS


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("combo", COMBINATIONS, ids=_ids)
def test_cuda_choice_per_importable_packages(monkeypatch, combo, precision):
    _stub(monkeypatch, {name: "2.5.0" for name in combo})  # a TE new enough for every fusion
    te, apex = "transformer_engine" in combo, "apex" in combo
    choice = select_kernels(KernelsSection(), "cuda", precision=precision)

    assert choice.layer_spec == ("transformer_engine" if te else "local")
    assert choice.attention == ("transformer_engine" if te else "torch-sdpa")
    assert choice.rotary == ("megatron-fused" if te else "crystal")  # without TE: Crystal's op in the SDPA core
    assert choice.layernorm == ("transformer_engine" if te else "apex" if apex else "torch")
    assert choice.adam == ("transformer_engine" if te else "apex" if apex else "torch")  # megatron's import order
    assert (choice.swiglu, choice.vocab) == ("megatron-fused", "megatron")
    # megatron's fused cross entropy hands back bf16 logit gradients: only where the logits are bf16 anyway
    assert choice.cross_entropy == ("megatron-fused" if precision == "bf16" else "megatron")
    flags = choice.flags
    assert flags["bias_activation_fusion"] and flags["bias_dropout_fusion"]
    assert flags["cross_entropy_loss_fusion"] == (precision == "bf16")
    assert flags["apply_rope_fusion"] == te
    assert flags["persist_layer_norm"] == (apex and not te)
    assert flags["gradient_accumulation_fusion"] == ("fused_weight_gradient_mlp_cuda" in combo)
    assert flags["masked_softmax_fusion"] is False
    assert flags.get("attention_backend") == ("auto" if te else None)
    if te:
        assert choice.reasons["attention"].startswith("TE picks flash-attn") == ("flash_attn" in combo)


@pytest.mark.parametrize("version, attention, rotary", [
    ("1.9.0", "torch-sdpa", "crystal"),  # TE < 1.10 would not pass softmax_scale: scores / sqrt(d)
    ("1.10.0", "transformer_engine", "megatron"),
    ("2.2.1", "transformer_engine", "megatron"),  # TE < 2.3 has no interleaved fused RoPE
    ("2.3.0+cu12", "transformer_engine", "megatron-fused"),
    (None, "torch-sdpa", "crystal"),  # unknown version: nothing that needs a minimum
])
def test_te_versions_keep_crystal_numerics(monkeypatch, version, attention, rotary):
    _stub(monkeypatch, {"transformer_engine": version})
    choice = select_kernels(KernelsSection(), "cuda")
    assert (choice.layer_spec, choice.attention, choice.rotary) == ("transformer_engine", attention, rotary)
    assert choice.flags["apply_rope_fusion"] == (rotary == "megatron-fused")
    if attention != "transformer_engine":
        assert "softmax_scale" in choice.reasons["attention"]
    if rotary != "megatron-fused":
        assert "RoPE" in choice.reasons["rotary"]


# switch -> (part of the choice, its torch path, the TransformerConfig flag it clears) with everything importable
OFF = {
    "transformer_engine": ("layer_spec", "local", None),
    "fused_layernorm": ("layernorm", "torch", "persist_layer_norm"),  # with TE off too (TE fuses its norms)
    "fused_adam": ("adam", "torch", None),
    "attention": ("attention", "megatron-unfused", None),
    "rotary": ("rotary", "megatron", "apply_rope_fusion"),
    "swiglu": ("swiglu", "megatron", "bias_activation_fusion"),
    "vocab": ("vocab", "megatron", None),
    "cross_entropy": ("cross_entropy", "megatron", "cross_entropy_loss_fusion"),
    "bias_dropout_fusion": (None, None, "bias_dropout_fusion"),
    "gradient_accumulation_fusion": (None, None, "gradient_accumulation_fusion"),
}


def test_every_switch_is_covered():
    assert set(OFF) == set(SWITCHES)


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_switch_forces_its_part_off(monkeypatch, switch, device):
    _stub(monkeypatch, {name: "2.5.0" for name in OPTIONAL_PACKAGES})
    auto = select_kernels(KernelsSection(), device, precision="bf16")  # bf16: every fusion is on
    extra = {"transformer_engine": "off"} if switch == "fused_layernorm" else {}
    off = select_kernels(KernelsSection(**{switch: "off", **extra}), device, precision="bf16")
    part, torch_path, flag = OFF[switch]
    if part is not None:
        assert getattr(off, part) == torch_path
    if flag is not None:
        assert off.flags[flag] is False
    newly_on = {f for f, on in off.flags.items() if on is True and auto.flags.get(f) is not True}
    # nothing else turns on, except apex's norm where TE's fused norms were
    assert newly_on <= ({"persist_layer_norm"} if switch == "transformer_engine" and device == "cuda" else set())
    if device == "cuda" and switch == "attention":
        assert off.flags["attention_backend"] == "unfused"  # TE's own unfused core


def test_reasons_name_what_kept_the_torch_path(monkeypatch):
    _stub(monkeypatch, {})
    choice = select_kernels(KernelsSection(), "cuda")
    assert choice.reasons["transformer_engine"] == "not importable"
    assert "fused_weight_gradient_mlp_cuda" in choice.reasons["gradient_accumulation_fusion"]
    assert "bf16" in choice.reasons["cross_entropy"]  # fp32: megatron's unfused cross entropy, and why
    off = select_kernels(KernelsSection(attention="off"), "cuda")
    assert off.reasons["attention"] == "kernels.attention: off"


def test_a_broken_install_counts_as_absent(monkeypatch):
    broken = types.ModuleType("transformer_engine")
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setattr(select.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(OSError("libcudart.so: cannot open")) if name ==
                        "transformer_engine" else broken)
    assert "transformer_engine" not in select.importable_packages(("transformer_engine",))


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device 'mps'"):
        select_kernels(KernelsSection(), "mps", {})


def test_announce_prints_once_and_writes_beside_the_resolved_config(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(select, "_announced", False)
    choice = select_kernels(KernelsSection(), "cpu", {})
    announce(choice, tmp_path / "run")
    announce(choice, tmp_path / "run")
    assert capsys.readouterr().out.count("kernels (cpu): layer_spec local, attention crystal-cpu") == 1
    written = yaml.safe_load((tmp_path / "run" / "kernels.yaml").read_text())
    assert written["attention"] == "crystal-cpu" and written["flags"] == TODAYS_CPU_FLAGS


def test_config_switches_are_typed():
    from megacrystal.config import ConfigError, load_config

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "crystal-tiny.yaml")
    with pytest.raises(ConfigError, match="kernels.attention"):
        load_config(tiny, ["kernels.attention=fast"])
    assert load_config(tiny, ["kernels.rotary=off"]).kernels.rotary == "off"
