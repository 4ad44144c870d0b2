"""The one place that decides which kernels a Crystal model runs: layer spec, fused kernels, TransformerConfig flags.

`select_kernels(switches, device, importable, precision)` is pure: it reads the config's `kernels:` switches, the
device type, which optional packages import (with their versions) and the precision, and returns a KernelChoice. Nothing here imports
megatron-core, so the decision is cheap to test for every combination. Crystal's numerics (25% interleaved
rotary, scores / head_dim, the muP multipliers, biases everywhere, LayerNorm with bias) hold in every path: a
fused kernel that cannot express one of them is not chosen, and the reason is recorded.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

# The optional packages the choice depends on. fused_weight_gradient_mlp_cuda is apex's CUDA extension (built
# with apex's --cuda_ext), which megatron's ColumnParallelLinear requires for gradient_accumulation_fusion.
OPTIONAL_PACKAGES = ("transformer_engine", "apex", "flash_attn", "fused_weight_gradient_mlp_cuda")

# Transformer Engine versions that change what can keep Crystal's numerics (megatron-core 0.16's checks):
TE_SOFTMAX_SCALE = (1, 10)  # TEDotProductAttention passes softmax_scale (scores / head_dim) from TE 1.10 on
TE_INTERLEAVED_ROPE = (2, 3)  # apply_rope_fusion with rotary_interleaved needs TE 2.3 (TransformerConfig raises)


@dataclass(frozen=True)
class KernelChoice:
    """What the model runs, per part, and the TransformerConfig flags that go with it."""

    device: str  # "cpu" | "cuda"
    layer_spec: str  # "local" (megatron's local spec, Crystal's norms) | "transformer_engine"
    attention: str  # "crystal-cpu" | "torch-sdpa" | "transformer_engine" | "megatron-unfused"
    rotary: str  # "crystal" (applied while the attention core copies q, k) | "megatron-fused" | "megatron"
    swiglu: str  # "crystal" (one autograd node) | "megatron-fused" | "megatron"
    vocab: str  # "crystal" (writes main_grad directly) | "megatron"
    cross_entropy: str  # "crystal" (blockwise fp32) | "megatron-fused" | "megatron"
    layernorm: str  # "torch" (CrystalLayerNorm) | "apex" | "transformer_engine"
    adam: str  # "torch" | "apex" | "transformer_engine": the class megatron's optimizer picks
    flags: dict = field(default_factory=dict)  # TransformerConfig fields
    reasons: dict = field(default_factory=dict)  # part -> why it is not the fastest option

    def summary(self) -> str:
        """One line for the start of a run."""
        parts = ("layer_spec", "attention", "rotary", "swiglu", "vocab", "cross_entropy", "layernorm", "adam")
        return f"kernels ({self.device}): " + ", ".join(f"{p} {getattr(self, p)}" for p in parts)

    def as_dict(self) -> dict:
        """Plain data for kernels.yaml (flags' values are bools, strings and numbers)."""
        return asdict(self)


def _version(module) -> tuple[int, ...] | None:
    text = str(getattr(module, "__version__", "") or "")
    numbers = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers) or None


def importable_packages(names=OPTIONAL_PACKAGES) -> dict[str, tuple[int, ...] | None]:
    """{package: version tuple (None when unknown)} of the optional packages that import here."""
    found = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken install counts as absent (ImportError, OSError from .so)
            continue
        found[name] = _version(module)
    return found


def _at_least(version: tuple[int, ...] | None, minimum: tuple[int, ...]) -> bool:
    return version is not None and version >= minimum


def _te(version: tuple[int, ...] | None) -> str:
    return f"TE {'.'.join(map(str, version))}" if version else "TE of unknown version"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def select_kernels(switches, device: str, importable: Mapping[str, tuple[int, ...] | None] | None = None,
                   precision: str = "fp32") -> KernelChoice:
    """The kernels for `device` ("cpu" or "cuda") and `precision` ("fp32" or "bf16") given the config's
    KernelsSection and the importable packages ({name: version}; default: what imports in this process)."""
    if device == "cpu":
        return _cpu_choice(switches)
    if device != "cuda":
        raise ValueError(f"no kernel choice for device {device!r} (cpu or cuda)")
    return _cuda_choice(switches, importable_packages() if importable is None else importable, precision)


def _off(switches, name: str) -> bool:
    return getattr(switches, name) == "off"


def _cpu_choice(s) -> KernelChoice:
    """megacrystal's own CPU kernels (docs/benchmarks/README.md has the measurements behind each)."""
    reasons = {}
    for name in ("transformer_engine", "fused_layernorm", "fused_adam", "bias_dropout_fusion",
                 "gradient_accumulation_fusion"):
        reasons[name] = "CUDA only"
    attention = "megatron-unfused" if _off(s, "attention") else "crystal-cpu"
    # Crystal's rotary is applied by its attention core; with megatron's core, megatron's RoPE applies it.
    rotary = "crystal" if attention == "crystal-cpu" and not _off(s, "rotary") else "megatron"
    if rotary == "megatron" and not _off(s, "rotary"):
        reasons["rotary"] = "megatron's attention core (kernels.attention: off) takes megatron's RoPE"
    flags = dict(bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                 apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
                 cross_entropy_loss_fusion=False)
    return KernelChoice(
        device="cpu", layer_spec="local", attention=attention, rotary=rotary,
        swiglu="megatron" if _off(s, "swiglu") else "crystal",
        vocab="megatron" if _off(s, "vocab") else "crystal",
        cross_entropy="megatron" if _off(s, "cross_entropy") else "crystal",
        layernorm="torch", adam="torch", flags=flags, reasons=reasons)


def _cuda_choice(s, have: Mapping[str, tuple[int, ...] | None], precision: str) -> KernelChoice:
    reasons = {}
    te_version = have.get("transformer_engine") if "transformer_engine" in have else None
    te = "transformer_engine" in have and not _off(s, "transformer_engine")
    apex = "apex" in have
    if "transformer_engine" not in have:
        reasons["transformer_engine"] = "not importable"
    elif not te:
        reasons["transformer_engine"] = "kernels.transformer_engine: off"

    # Norms: TE's spec fuses them into the following linear; else apex's FusedLayerNorm (with bias, and it marks
    # its parameters sequence_parallel as CrystalLayerNorm does); else torch's LayerNorm.
    if te:
        layernorm = "transformer_engine"
    elif apex and not _off(s, "fused_layernorm"):
        layernorm = "apex"
    else:
        layernorm = "torch"
        reasons["fused_layernorm"] = "kernels.fused_layernorm: off" if apex else "apex not importable"

    # Attention: TE's DotProductAttention honours softmax_scale only from TE 1.10; torch's SDPA (its flash
    # kernel on a GPU) takes the scale always. Off: megatron's unfused core (TE's unfused backend under TE).
    backend = {}  # TransformerConfig.attention_backend, which only TE's attention reads
    if _off(s, "attention"):
        attention = "megatron-unfused"
        backend = {"attention_backend": "unfused"} if te else {}
        reasons["attention"] = "kernels.attention: off"
    elif te and _at_least(te_version, TE_SOFTMAX_SCALE):
        attention = "transformer_engine"
        backend = {"attention_backend": "auto"}
        reasons["attention"] = ("TE picks flash-attn or cuDNN fused attention per shape" if "flash_attn" in have
                                else "TE picks cuDNN fused attention (flash-attn not importable)")
    else:
        attention = "torch-sdpa"
        if te:
            reasons["attention"] = (f"{_te(te_version)} may ignore softmax_scale (scores / head_dim): it is "
                                    f"passed from TE {_dotted(TE_SOFTMAX_SCALE)} on; torch's SDPA keeps it")

    # Rotary: megatron's fused RoPE is TE's kernel, which rotates the first rotary_dim dims (25%) and does the
    # interleaved (GPT-J) layout from TE 2.3. Else Crystal's own op inside the attention core when that core
    # is Crystal's, megatron's unfused RoPE otherwise.
    if _off(s, "rotary"):
        rotary = "megatron"
        reasons["rotary"] = "kernels.rotary: off"
    elif "transformer_engine" in have and _at_least(te_version, TE_INTERLEAVED_ROPE):
        rotary = "megatron-fused"
    else:
        rotary = "crystal" if attention == "torch-sdpa" else "megatron"
        reasons["rotary"] = ("TE not importable" if "transformer_engine" not in have else
                             f"{_te(te_version)}: TE fuses interleaved RoPE from {_dotted(TE_INTERLEAVED_ROPE)}")

    swiglu = "megatron" if _off(s, "swiglu") else "megatron-fused"  # bias_swiglu_impl: [gate; up], silu(gate)
    if swiglu == "megatron":
        reasons["swiglu"] = "kernels.swiglu: off"
    # megatron-core 0.16's fused (native) cross entropy computes in fp32 but returns the logits' gradient in bf16
    # whatever the logits' dtype (fused_cross_entropy.calculate_gradients): exact for bf16 logits only.
    if _off(s, "cross_entropy"):
        cross_entropy = "megatron"
        reasons["cross_entropy"] = "kernels.cross_entropy: off"
    elif precision != "bf16":
        cross_entropy = "megatron"
        reasons["cross_entropy"] = ("megatron's fused cross entropy rounds the logits' gradient to bf16; "
                                    "fp32 keeps the unfused one")
    else:
        cross_entropy = "megatron-fused"
    reasons["vocab"] = "megacrystal's vocabulary layers are tuned for CPU; megatron's on CUDA"

    # megatron's output layer (a ColumnParallelLinear under any spec) refuses gradient_accumulation_fusion
    # without apex's fused_weight_gradient_mlp_cuda extension.
    grad_fusion = "fused_weight_gradient_mlp_cuda" in have and not _off(s, "gradient_accumulation_fusion")
    if not grad_fusion:
        reasons["gradient_accumulation_fusion"] = ("kernels.gradient_accumulation_fusion: off"
                                                  if _off(s, "gradient_accumulation_fusion")
                                                  else "apex's fused_weight_gradient_mlp_cuda not importable")
    bias_dropout = not _off(s, "bias_dropout_fusion")
    if not bias_dropout:
        reasons["bias_dropout_fusion"] = "kernels.bias_dropout_fusion: off"

    # megatron's optimizer picks TE's FusedAdam, else apex's, else torch's AdamW, when it is imported.
    if _off(s, "fused_adam"):
        adam = "torch"
        reasons["fused_adam"] = "kernels.fused_adam: off"
    else:
        adam = "transformer_engine" if "transformer_engine" in have else "apex" if apex else "torch"
        if adam == "torch":
            reasons["fused_adam"] = "neither TE nor apex importable"

    flags = dict(
        bias_activation_fusion=swiglu == "megatron-fused",
        # megatron's fused softmax serves only its local unfused attention core, which is not used when any
        # faster core is available; its CUDA kernels ship with Megatron-LM, not megatron-core.
        masked_softmax_fusion=False,
        bias_dropout_fusion=bias_dropout,
        apply_rope_fusion=rotary == "megatron-fused",
        gradient_accumulation_fusion=grad_fusion,
        persist_layer_norm=layernorm == "apex",
        cross_entropy_loss_fusion=cross_entropy == "megatron-fused",
        **backend,
    )
    return KernelChoice(device="cuda", layer_spec="transformer_engine" if te else "local", attention=attention,
                        rotary=rotary, swiglu=swiglu, vocab="megatron", cross_entropy=cross_entropy,
                        layernorm=layernorm, adam=adam, flags=flags, reasons=reasons)


_announced = False


def announce(choice: KernelChoice, run_dir: str | Path | None) -> None:
    """Print the choice once per process and write it to <run_dir>/kernels.yaml (beside config.resolved.yaml)."""
    global _announced
    if not _announced:
        print(choice.summary(), flush=True)
        _announced = True
    if run_dir is None:
        return
    import yaml

    path = Path(run_dir) / "kernels.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(choice.as_dict(), sort_keys=False))
    tmp.replace(path)
