"""Crystal's forward pass in plain PyTorch, written from crystal-spec §1.2's formulas (the test oracle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J pairs (0,1),(2,3),...: (x0, x1) -> (-x1, x0)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """LLaMA/NeoX halves layout; used only as a negative control."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, rotary_dim: int, base: float, interleaved: bool = True) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of each head of x [B, T, nh, dh]; the rest pass through."""
    seq = x.shape[1]
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq).to(x.dtype)  # [T, r/2]
    if interleaved:
        angles = angles.repeat_interleave(2, dim=-1)  # [f0, f0, f1, f1, ...]
        rotate = rotate_every_two
    else:
        angles = torch.cat((angles, angles), dim=-1)
        rotate = rotate_half
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate(rot) * sin, rest), dim=-1)


def crystal_logits(w: dict[str, torch.Tensor], tokens: torch.Tensor, *, num_layers: int, num_heads: int,
                   rotary_dim: int, rotary_base: float, eps: float, embeddings_scale: float,
                   output_logits_scale: float, interleaved: bool = True,
                   head: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] of Crystal for `tokens` [B, T] with weights named as in the spec (wte, h.i.*, ln_f);
    `head` replaces wte in the tied output projection (tests separate the two uses' gradients with it)."""
    batch, seq = tokens.shape
    hidden = w["wte"].shape[1]
    dh = hidden // num_heads
    h = w["wte"][tokens] * embeddings_scale
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    for i in range(num_layers):
        p = f"h.{i}."
        a = F.layer_norm(h, (hidden,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        q, k, v = (F.linear(a, w[p + f"attn.{n}.weight"], w[p + f"attn.{n}.bias"]).view(batch, seq, num_heads, dh)
                   for n in ("q", "k", "v"))
        q, k = rope(q, rotary_dim, rotary_base, interleaved), rope(k, rotary_dim, rotary_base, interleaved)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / dh  # muP: 1/d_head, not 1/sqrt(d_head)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")).float(), dim=-1).to(v.dtype)
        o = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, hidden)
        h = h + F.linear(o, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        m = F.layer_norm(h, (hidden,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        up = F.linear(m, w[p + "mlp.up.weight"], w[p + "mlp.up.bias"])
        gate = F.linear(m, w[p + "mlp.gate.weight"], w[p + "mlp.gate.bias"])
        h = h + F.linear(up * F.silu(gate), w[p + "mlp.down.weight"], w[p + "mlp.down.bias"])
    hf = F.layer_norm(h, (hidden,), w["ln_f.weight"], w["ln_f.bias"], eps)
    return F.linear(hf, w["wte"] if head is None else head) * output_logits_scale  # tied head, no bias
