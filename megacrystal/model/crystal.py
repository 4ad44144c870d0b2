"""The Crystal architecture on megatron-core's GPTModel.

Crystal (crystal-spec §1.2) is a pre-LN decoder: LayerNorm with bias, SwiGLU `up * silu(gate)` with biases,
rotary position embedding on the first 25% of each head in the interleaved (GPT-J) layout, attention scores
divided by head_dim (muP), embeddings x 14.6 and logits x 0.13875, tied input/output embeddings, no output bias,
no dropout. The rest is megatron-core config options, except: the two muP multipliers are forward hooks, so
the stored weights stay exactly Crystal's. Which kernels run each part (megacrystal's CPU kernels, Transformer
Engine, apex, megatron's fusions) is one KernelChoice from kernels/select.py; when Crystal's attention core
applies the rotary embedding (kernels/rotary.py), GPTModel is built without one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config.schema import KernelsSection, ModelSection, ParallelSection
from ..kernels.cross_entropy import vocab_parallel_cross_entropy
from ..kernels.select import KernelChoice, select_kernels
from ..kernels.spec import layer_spec, norm_class
from ..kernels.swiglu import use_swiglu_mlp
from ..kernels.vocab import use_vocab_layers


def default_kernels(precision: str = "fp32") -> KernelChoice:
    """The kernels with every switch on auto, for this process's device (CUDA when torch sees one)."""
    return select_kernels(KernelsSection(), "cuda" if torch.cuda.is_available() else "cpu", precision=precision)


def transformer_config(model: ModelSection, parallel: ParallelSection, precision: str = "fp32",
                       kernels: KernelChoice | None = None) -> TransformerConfig:
    """megatron-core TransformerConfig for a Crystal model under the given parallel layout and kernels."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    kernels = kernels or default_kernels(precision)
    flags = dict(kernels.flags)
    if "attention_backend" in flags:
        from megatron.core.transformer.enums import AttnBackend

        flags["attention_backend"] = AttnBackend[flags["attention_backend"]]
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=model.layernorm_eps,
        gated_linear_unit=True,  # fc1 = [gate; up], act = silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=True,
        add_qkv_bias=True,
        rotary_interleaved=model.rotary_interleaved,
        softmax_scale=(1.0 / model.head_dim) if model.scale_qk_dot_by_d else None,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        # Weights are initialised by model/init.py, identically for every parallel layout.
        use_cpu_initialization=True,
        perform_initialization=False,
        # Loss is summed over tokens and gradients are divided by the global token count, so micro-batching
        # and data parallelism give exactly the single-process gradient.
        calculate_per_token_loss=True,
        **flags,  # fusions: kernels/select.py (all off on a CPU, where the torch paths are exact and fast)
    )


def block_spec(config: TransformerConfig, model: ModelSection, vp_stage: int | None,
               kernels: KernelChoice) -> TransformerBlockSubmodules:
    """This stage's layers, all of the chosen spec (kernels/spec.py), and the final LayerNorm."""
    layer = layer_spec(kernels, model)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm_class(kernels))


class CrystalGPTModel(GPTModel):
    """GPTModel plus Crystal's muP multipliers: embeddings x embeddings_scale, logits x output_logits_scale."""

    def __init__(self, *args, embeddings_scale: float, output_logits_scale: float, kernels: KernelChoice,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.embeddings_scale = embeddings_scale
        self.output_logits_scale = output_logits_scale
        self.kernels = kernels
        self.compiled = False
        if kernels.vocab == "crystal":  # the tied weight's gradients written into megatron's main_grad
            use_vocab_layers(self)
        if kernels.swiglu == "crystal":  # one autograd node for the gated unit
            for layer in self.decoder.layers:
                use_swiglu_mlp(layer)
        if self.pre_process:  # the embedding exists on the first pipeline stage only
            self.embedding.register_forward_hook(self._scale_embeddings)
        if self.post_process:  # logits x scale, on every TP rank's vocab shard
            self.output_layer.register_forward_pre_hook(self._scale_logits)

    def compile_layers_and_loss(self) -> None:
        """torch.compile (inductor) for every transformer layer and the loss gradient (train.compile); the
        embedding and output layer stay eager: their matmuls are single library calls either way."""
        for layer in self.decoder.layers:
            layer.self_attention.core_attention.compiled_backward = True
            layer.compile()
        self.compiled = True
        if self.post_process:
            self.output_layer.compiled = True

    def compute_language_model_loss(self, labels, logits):
        """Per-token loss [b, s]: megacrystal's blockwise fp32 cross entropy (kernels/cross_entropy.py) or, as
        the choice says, megatron's (fused or not)."""
        if self.kernels.cross_entropy != "crystal":
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(),
                                            ps.get_tensor_model_parallel_group(), compiled=self.compiled)
        return loss.transpose(0, 1).contiguous()

    def _scale_embeddings(self, module, inputs, output):
        return output * self.embeddings_scale

    def _scale_logits(self, module, inputs):
        # The output layer is linear without bias, so (x * c) W^T = (x W^T) * c: scaling its [s, b, h] input
        # costs vocab/hidden (here 62x) less than scaling the [s, b, vocab] logits, forward and backward.
        hidden, *rest = inputs
        return (hidden * self.output_logits_scale, *rest)


def build_model_chunks(model: ModelSection, parallel: ParallelSection, precision: str = "fp32",
                       kernels: KernelChoice | None = None) -> list[CrystalGPTModel]:
    """This rank's model: one chunk, or one per virtual pipeline stage (interleaved 1F1B), with the given kernels
    (default: every switch on auto for this process's device)."""
    kernels = kernels or default_kernels(precision)
    config = transformer_config(model, parallel, precision, kernels)
    own_rotary = kernels.rotary == "crystal"  # the attention core applies it; else GPTModel's RoPE
    chunks = []
    for vp_stage in range(parallel.vpp) if parallel.vpp else [None]:
        chunks.append(CrystalGPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, model, vp_stage, kernels),
            vocab_size=model.vocab_size,
            max_sequence_length=model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=True,
            position_embedding_type="none" if own_rotary else "rope",
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            vp_stage=vp_stage,
            embeddings_scale=model.embeddings_scale,
            output_logits_scale=model.output_logits_scale,
            kernels=kernels,
        ))
    return chunks
