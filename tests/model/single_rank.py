"""Checks that need megatron-core in one process; run in a spawned rank by test_crystal.py."""
from __future__ import annotations

import resource

import torch

from megacrystal.config import config_from_dict, load_config
from megacrystal.distributed.runtime import setup_parallel, teardown_parallel

from .reference import crystal_logits

SMALL = {
    "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96, "vocab_size": 128,
              "seq_length": 32, "embeddings_scale": 14.6, "output_logits_scale": 0.13875,
              "mup_width_scale": 0.25},
    "optim": {"lr": 1e-3},
    "train": {"steps": 1, "global_batch_size": 2, "seed": 7},
}


def reference_weights(sd: dict[str, torch.Tensor], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """megatron-core's Crystal state dict -> the spec's per-matrix weights (q, k, v, up, gate separate)."""
    w = {"wte": sd["embedding.word_embeddings.weight"],
         "ln_f.weight": sd["decoder.final_layernorm.weight"], "ln_f.bias": sd["decoder.final_layernorm.bias"]}
    for i in range(num_layers):
        m, p = f"decoder.layers.{i}.", f"h.{i}."
        qkv_w, qkv_b = sd[m + "self_attention.linear_qkv.weight"], sd[m + "self_attention.linear_qkv.bias"]
        hidden = qkv_w.shape[1]
        dh = hidden // num_heads
        qkv_w, qkv_b = qkv_w.view(num_heads, 3, dh, hidden), qkv_b.view(num_heads, 3, dh)  # per head [q; k; v]
        for j, name in enumerate("qkv"):
            w[p + f"attn.{name}.weight"] = qkv_w[:, j].reshape(hidden, hidden)
            w[p + f"attn.{name}.bias"] = qkv_b[:, j].reshape(hidden)
        w[p + "attn.proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
        w[p + "attn.proj.bias"] = sd[m + "self_attention.linear_proj.bias"]
        gate_w, up_w = sd[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)  # fc1 = [gate; up]
        gate_b, up_b = sd[m + "mlp.linear_fc1.bias"].chunk(2, dim=0)
        w.update({p + "mlp.gate.weight": gate_w, p + "mlp.gate.bias": gate_b,
                  p + "mlp.up.weight": up_w, p + "mlp.up.bias": up_b,
                  p + "mlp.down.weight": sd[m + "mlp.linear_fc2.weight"],
                  p + "mlp.down.bias": sd[m + "mlp.linear_fc2.bias"]})
        for mine, spec in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            w[p + spec + ".weight"], w[p + spec + ".bias"] = sd[m + mine + ".weight"], sd[m + mine + ".bias"]
    return w


def reference_kwargs(m) -> dict:
    """crystal_logits' model arguments from a ModelSection."""
    return dict(num_layers=m.num_layers, num_heads=m.num_heads, rotary_dim=m.rotary_dim,
                rotary_base=m.rotary_base, eps=m.layernorm_eps, embeddings_scale=m.embeddings_scale,
                output_logits_scale=m.output_logits_scale)


def forward_against_reference() -> dict:
    """Max relative logit difference of megatron Crystal vs the plain-PyTorch spec (and negative controls)."""
    from megacrystal.config.schema import KernelsSection
    from megacrystal.kernels.select import select_kernels
    from megacrystal.model.crystal import build_model_chunks
    from megacrystal.model.init import init_crystal_weights

    config = config_from_dict(SMALL)
    m = config.model
    denormal = torch.tensor([1e-39])  # below fp32's smallest normal number
    kept_before = bool(denormal * 1.0 != 0)
    setup_parallel(config)
    flushed_after = bool(denormal * 1.0 == 0)
    try:
        (model,) = build_model_chunks(m, config.parallel)
        init_crystal_weights([model], m, seed=3)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():  # make every bias and norm parameter matter
            for name, param in model.named_parameters():
                base = 1.0 if name.endswith("layernorm.weight") else 0.0
                param.copy_(base + 0.2 * torch.randn(param.shape, generator=gen))
        tokens = torch.randint(0, m.vocab_size, (2, m.seq_length), generator=gen)
        positions = torch.arange(m.seq_length).expand_as(tokens)
        model.eval()
        with torch.no_grad():
            ours = model(tokens, positions, None)
        weights = reference_weights({k: v.detach() for k, v in model.state_dict().items()
                                     if not k.endswith("_extra_state")}, m.num_layers, m.num_heads)
        kwargs = reference_kwargs(m)
        ref = crystal_logits(weights, tokens, **kwargs)
        rotate_half = crystal_logits(weights, tokens, **kwargs, interleaved=False)
        no_mup = crystal_logits(weights, tokens, **{**kwargs, "embeddings_scale": 1.0})

        def rel(a, b):
            return float((a - b).abs().max() / b.abs().max())

        # Every kernel switch off: megatron's own attention core, RoPE, MLP, vocabulary layers and loss (the torch
        # reference paths of kernels/), with the same weights, against the same spec.
        off = KernelsSection(**{name: "off" for name in KernelsSection.model_fields})
        (plain,) = build_model_chunks(m, config.parallel, kernels=select_kernels(off, "cpu", {}))
        plain.load_state_dict(model.state_dict())
        plain.eval()
        with torch.no_grad():
            theirs = plain(tokens, positions, None)
        layer = plain.decoder.layers[0]
        classes = sorted({type(layer.self_attention.core_attention).__name__, type(layer.mlp).__name__,
                          type(plain.embedding.word_embeddings).__name__, type(plain.output_layer).__name__})
        return {"rel": rel(ours, ref), "rel_rotate_half": rel(rotate_half, ref), "rel_no_mup": rel(no_mup, ref),
                "rel_torch_paths": rel(theirs, ref), "torch_path_classes": classes,
                "shape": tuple(ours.shape), "rotary_dim": m.rotary_dim, "head_dim": m.head_dim,
                "denormals": {"kept_before_setup": kept_before, "flushed_after_setup": flushed_after}}
    finally:
        teardown_parallel()


def gradients_against_reference() -> dict:
    """Gradients against autograd through the spec's formulas in float64, in fp32 and bf16: the tied vocabulary
    weight (embedding + output projection, kernels/vocab.py), the final norm (through the projection's input
    gradient) and a layer's fc2 weight. Three ways: megatron DDP's fp32 main_grad as the engine keeps it
    (distributed/grad_buffer.py: a stale buffer from an earlier step overwritten, then a second micro-batch
    added), and a plain .grad without DDP (the DeepSpeed engine's path)."""
    from megacrystal.engines.megatron import MegatronEngine
    from megacrystal.model.crystal import build_model_chunks

    names = {"wte": "embedding.word_embeddings.weight", "ln_f": "decoder.final_layernorm.weight",
             "h.1.mlp.down.weight": "decoder.layers.1.mlp.linear_fc2.weight"}
    results = {}
    for precision in ("fp32", "bf16"):
        config = config_from_dict({**SMALL, "train": {**SMALL["train"], "precision": precision}})
        m = config.model
        layout = setup_parallel(config)
        try:
            (bare,) = build_model_chunks(m, config.parallel, precision)
            wrapped = MegatronEngine(config, layout).model[0]
            gen = torch.Generator().manual_seed(13)
            with torch.no_grad():
                for param in bare.parameters():
                    param.copy_(0.3 * torch.randn(param.shape, generator=gen) + (1.0 if param.dim() == 1 else 0.0))
                wrapped.module.load_state_dict(bare.state_dict())
            tokens = torch.randint(0, m.vocab_size, (2, m.seq_length), generator=gen)
            labels = torch.randint(0, m.vocab_size, (2, m.seq_length), generator=gen)
            positions = torch.arange(m.seq_length).expand_as(tokens)
            wrapped_params = dict(wrapped.module.named_parameters())

            def loss(model, targets=labels):
                return model(tokens, positions, None, labels=targets).sum()

            loss(bare).backward()
            loss(wrapped, labels.flip(0)).backward()  # an earlier step's gradients, left in the buffer
            wrapped.zero_grad_buffer()
            loss(wrapped).backward()
            got = {"main_grad": {k: wrapped_params[n].main_grad.clone() for k, n in names.items()},
                   "grad": {k: bare.get_parameter(n).grad for k, n in names.items()}}
            loss(wrapped).backward()  # a second micro-batch of the same step: added
            got["main_grad_accumulated"] = {k: wrapped_params[n].main_grad / 2 for k, n in names.items()}
            wrapped.zero_grad_buffer()
            wrapped.zero_stale_gradients()  # no backward this step: all gradients zeroed
            results[f"{precision}/stale_zeroed"] = all(
                bool((p.main_grad == 0).all()) for p in wrapped_params.values())

            weights = {k: v.detach().double().requires_grad_()
                       for k, v in reference_weights({k: v for k, v in bare.state_dict().items()
                                                      if not k.endswith("_extra_state")},
                                                     m.num_layers, m.num_heads).items()}
            kwargs = reference_kwargs(m)

            def reference_loss(**overrides):
                logits = crystal_logits({**weights, **overrides}, tokens, **kwargs, head=weights["wte"])
                return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

            reference_loss().backward()
            reference = {k: weights[k if k != "ln_f" else "ln_f.weight"].grad.clone() for k in names}

            def rel(a, b):
                return float((a.double() - b).abs().max() / b.abs().max())

            for path, grads in got.items():
                results[f"{precision}/{path}"] = {k: rel(grads[k], reference[k]) for k in names}
            # Negative control: the output projection's share alone (the lookup's weight a constant).
            weights["wte"].grad = None
            reference_loss(wte=weights["wte"].detach()).backward()
            results[f"{precision}/control_output_use_only"] = rel(weights["wte"].grad, reference["wte"])
        finally:
            teardown_parallel()
    return results


def core_attention_against_megatron() -> dict:
    """Our SDPA core attention against megatron's unfused DotProductAttention: outputs and input gradients."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megacrystal.kernels.attention import CrystalCoreAttention
    from megacrystal.model.crystal import transformer_config

    config = config_from_dict(SMALL)
    setup_parallel(config)
    try:
        tconfig = transformer_config(config.model, config.parallel)
        gen = torch.Generator().manual_seed(5)
        s, b, heads, dim = config.model.seq_length, 2, config.model.num_heads, config.model.head_dim
        inputs = [torch.randn(s, b, heads, dim, generator=gen) for _ in range(3)]
        results = []
        for cls in (CrystalCoreAttention, DotProductAttention):
            module = cls(tconfig, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                         softmax_scale=tconfig.softmax_scale)
            q, k, v = (t.clone().requires_grad_() for t in inputs)
            out = module(q, k, v, None)
            out.backward(torch.ones_like(out).cumsum(0))  # a gradient that differs across positions
            results.append((out.detach(), q.grad, k.grad, v.grad))
        ours, megatron = results
        return {"shape": tuple(ours[0].shape), "expected": (s, b, heads * dim),
                "max_diff": max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(ours, megatron))}
    finally:
        teardown_parallel()


def cuda_choice_on_cpu() -> dict:
    """The CUDA choice without TE or apex (megatron's local spec, fused bias-SwiGLU, bias-dropout-add, Crystal's
    attention core with torch's SDPA) built on this CPU: logits against the spec, loss gradients against the CPU
    choice; and the same with megatron's fused cross entropy forced on in fp32 (what the choice avoids)."""
    import dataclasses

    from megacrystal.config.schema import KernelsSection
    from megacrystal.kernels.select import select_kernels
    from megacrystal.model.crystal import build_model_chunks
    from megacrystal.model.init import init_crystal_weights

    config = config_from_dict(SMALL)
    m = config.model
    setup_parallel(config)
    try:
        cuda = select_kernels(KernelsSection(), "cuda", {})
        fused_ce = dataclasses.replace(cuda, cross_entropy="megatron-fused",
                                       flags={**cuda.flags, "cross_entropy_loss_fusion": True})
        gen = torch.Generator().manual_seed(13)
        tokens = torch.randint(0, m.vocab_size, (2, m.seq_length), generator=gen)
        labels = torch.randint(0, m.vocab_size, (2, m.seq_length), generator=gen)
        positions = torch.arange(m.seq_length).expand_as(tokens)
        grads, logits, names = {}, None, {}
        for key, kernels in (("cpu", None), ("cuda", cuda), ("cuda_fused_ce", fused_ce)):
            (model,) = build_model_chunks(m, config.parallel, kernels=kernels)
            init_crystal_weights([model], m, seed=3)
            model(tokens, positions, None, labels=labels).sum().backward()
            grads[key] = {n: p.grad for n, p in model.named_parameters()}
            layer = model.decoder.layers[0]
            names[key] = [type(layer.mlp).__name__, model.config.bias_activation_fusion,
                          model.config.cross_entropy_loss_fusion]
            if key == "cuda":
                with torch.no_grad():
                    logits = model(tokens, positions, None)
                weights = reference_weights({k: v.detach() for k, v in model.state_dict().items()
                                             if not k.endswith("_extra_state")}, m.num_layers, m.num_heads)
                ref = crystal_logits(weights, tokens, **reference_kwargs(m))

        def grad_rel(key):
            return max(float((grads[key][n] - g).abs().max() / g.abs().max()) for n, g in grads["cpu"].items())

        return {"rel_logits": float((logits - ref).abs().max() / ref.abs().max()), "rel_grads": grad_rel("cuda"),
                "rel_grads_fused_ce": grad_rel("cuda_fused_ce"), "modules": names}
    finally:
        teardown_parallel()


def crystal_7b_on_meta(config_path: str) -> dict:
    """Build the real 7B on the meta device; report per-parameter init std and optimizer groups."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer import _get_param_groups

    from megacrystal.model.crystal import build_model_chunks
    from megacrystal.model.init import init_std
    from megacrystal.model.names import global_named_parameters, param_kind
    from megacrystal.model.param_groups import megatron_group_overrides

    config = load_config(config_path, ["parallel.tp=1", "parallel.pp=1", "parallel.sp=false",
                                       "parallel.distributed_optimizer=false"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    setup_parallel(config)
    try:
        with torch.device("meta"):
            (model,) = build_model_chunks(config.model, config.parallel, "fp32")
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        params = {}
        for name, param in global_named_parameters(model):
            kind = param_kind(name, param.dim())
            params[name] = {"kind": kind, "std": init_std(config.model, kind), "numel": param.numel(),
                            "meta": param.is_meta}
        groups = _get_param_groups([model], OptimizerConfig(lr=config.optim.lr, weight_decay=0.1),
                                   megatron_group_overrides(config.model))
        ids = {id(p): n for n, p in model.named_parameters()}
        group_of = {ids[id(p)]: (g["lr_mult"], g["wd_mult"]) for g in groups for p in g["params"]}
        return {"params": params, "groups": group_of, "rss_growth_kb": rss_after - rss_before}
    finally:
        teardown_parallel()


def model_checks(config_path: str) -> dict:
    """Everything test_crystal.py asserts on, from one process (megatron-core imports once)."""
    from megacrystal.kernels import vocab

    vocab.VOCAB_BLOCK = 48  # the 128-token vocabulary's logits in three GEMMs, the last one ragged
    return {"forward": forward_against_reference(), "meta7b": crystal_7b_on_meta(config_path),
            "cuda_choice": cuda_choice_on_cpu(),
            "attention": core_attention_against_megatron(), "grads": gradients_against_reference()}
