"""megatron-core layer specs for a KernelChoice (select.py): megatron's local spec with Crystal's kernels, or
Transformer Engine's spec with whatever part of it cannot keep Crystal's numerics swapped back."""
from __future__ import annotations

import functools

from megatron.core.transformer.spec_utils import ModuleSpec

from .layernorm import CrystalLayerNorm
from .attention import CrystalCoreAttention
from .rotary import RotaryEmbedding
from .row_parallel import CrystalRowParallelLinear
from .select import KernelChoice


def _core_attention(choice: KernelChoice, model):
    """Crystal's attention core (with its rotary op when the choice says so), or None to keep the spec's own."""
    if choice.attention not in ("crystal-cpu", "torch-sdpa"):
        return None
    rotary = None
    if choice.rotary == "crystal":
        rotary = RotaryEmbedding(model.rotary_dim, model.rotary_base, model.rotary_interleaved)
    return functools.partial(CrystalCoreAttention, rotary=rotary)


def norm_class(choice: KernelChoice):
    """The LayerNorm (with bias) class for the choice: megatron's apex/TE wrappers or CrystalLayerNorm."""
    if choice.layernorm == "apex":
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return FusedLayerNorm
    if choice.layernorm == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return CrystalLayerNorm


def layer_spec(choice: KernelChoice, model) -> ModuleSpec:
    """One transformer layer's ModuleSpec (model: the config's ModelSection)."""
    core_attention = _core_attention(choice, model)
    if choice.layer_spec == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer = get_gpt_layer_with_transformer_engine_spec()  # norms fused into the following linears
        if core_attention is not None:
            layer.submodules.self_attention.submodules.core_attention = core_attention
        return layer
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer = get_gpt_layer_local_spec(normalization="LayerNorm")
    norm = norm_class(choice)
    layer.submodules.input_layernorm = norm
    layer.submodules.pre_mlp_layernorm = norm
    if core_attention is not None:
        layer.submodules.self_attention.submodules.core_attention = core_attention
    layer.submodules.self_attention.submodules.linear_proj = CrystalRowParallelLinear
    layer.submodules.mlp.submodules.linear_fc2 = CrystalRowParallelLinear
    return layer


_megatron_picked_torch_adam: bool | None = None


def use_adam(choice: KernelChoice) -> None:
    """Make megatron's optimizer build the chosen Adam. megatron picks TE's FusedAdam, else apex's, else torch's
    AdamW when it is imported; kernels.fused_adam: off (choice.adam "torch") makes it build torch's AdamW."""
    import megatron.core.optimizer as optimizer

    global _megatron_picked_torch_adam
    if _megatron_picked_torch_adam is None:
        _megatron_picked_torch_adam = optimizer.USING_PYTORCH_OPTIMIZER
    optimizer.USING_PYTORCH_OPTIMIZER = _megatron_picked_torch_adam or choice.adam == "torch"
