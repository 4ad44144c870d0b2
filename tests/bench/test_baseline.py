"""The bench's plain-PyTorch baseline computes the same model as the spec's formulas (tests/model/reference.py)."""
import torch
import torch.nn.functional as F

from megacrystal.bench.baseline import PlainCrystal
from megacrystal.config import config_from_dict
from tests.model.reference import crystal_logits


def test_plain_baseline_matches_the_reference_forward():
    m = config_from_dict({
        "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 96, "vocab_size": 128,
                  "seq_length": 32, "mup_width_scale": 0.25},
        "optim": {"lr": 1e-3}, "train": {"steps": 1, "global_batch_size": 2}}).model
    torch.manual_seed(0)
    model = PlainCrystal(m)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    w = {"wte": model.embed.weight, "ln_f.weight": model.ln_f.weight, "ln_f.bias": model.ln_f.bias}
    for i, b in enumerate(model.blocks):
        p = f"h.{i}."
        for n, t in zip("qkv", b.qkv.weight.chunk(3)):
            w[p + f"attn.{n}.weight"] = t
        for n, t in zip("qkv", b.qkv.bias.chunk(3)):
            w[p + f"attn.{n}.bias"] = t
        gate_w, up_w = b.gate_up.weight.chunk(2)
        gate_b, up_b = b.gate_up.bias.chunk(2)
        w.update({p + "attn.proj.weight": b.proj.weight, p + "attn.proj.bias": b.proj.bias,
                  p + "mlp.gate.weight": gate_w, p + "mlp.gate.bias": gate_b, p + "mlp.up.weight": up_w,
                  p + "mlp.up.bias": up_b, p + "mlp.down.weight": b.down.weight, p + "mlp.down.bias": b.down.bias,
                  p + "ln_1.weight": b.ln1.weight, p + "ln_1.bias": b.ln1.bias,
                  p + "ln_2.weight": b.ln2.weight, p + "ln_2.bias": b.ln2.bias})
    tokens = torch.randint(0, 128, (2, 33))
    with torch.no_grad():
        ours = model(tokens[:, :-1], tokens[:, 1:])
        logits = crystal_logits(w, tokens[:, :-1], num_layers=2, num_heads=4, rotary_dim=m.rotary_dim,
                                rotary_base=m.rotary_base, eps=m.layernorm_eps, embeddings_scale=m.embeddings_scale,
                                output_logits_scale=m.output_logits_scale)
        ref = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-5
