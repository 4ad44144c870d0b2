"""The yardstick every bench report shows: Crystal's math as a plain PyTorch eager model and training step.

Same shapes, formulas and optimizer as the megatron engine (LayerNorm with bias, SwiGLU, 25% interleaved rotary,
scores / head_dim, muP multipliers, tied embeddings, AdamW), written the way a careful user would in plain
PyTorch: fused QKV and gate/up projections and PyTorch's scaled_dot_product_attention.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import ModelSection


class _Block(nn.Module):
    def __init__(self, m: ModelSection):
        super().__init__()
        h = m.hidden_size
        self.heads, self.head_dim, self.rotary_dim = m.num_heads, m.head_dim, m.rotary_dim
        self.ln1, self.ln2 = nn.LayerNorm(h, eps=m.layernorm_eps), nn.LayerNorm(h, eps=m.layernorm_eps)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.gate_up, self.down = nn.Linear(h, 2 * m.ffn_hidden_size), nn.Linear(m.ffn_hidden_size, h)

    def _rotate(self, x, cos, sin):
        r = self.rotary_dim
        rot, rest = x[..., :r], x[..., r:]
        pairs = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)  # GPT-J rotate-every-two
        return torch.cat((rot * cos + pairs * sin, rest), dim=-1)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=1.0 / self.head_dim)
        x = x + self.proj(o.transpose(1, 2).reshape(b, s, h))
        gate, up = self.gate_up(self.ln2(x)).chunk(2, dim=-1)
        return x + self.down(up * F.silu(gate))


class PlainCrystal(nn.Module):
    """Crystal in plain PyTorch (eager)."""

    def __init__(self, m: ModelSection):
        super().__init__()
        self.m = m
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        self.blocks = nn.ModuleList(_Block(m) for _ in range(m.num_layers))
        self.ln_f = nn.LayerNorm(m.hidden_size, eps=m.layernorm_eps)
        inv_freq = 1.0 / m.rotary_base ** (torch.arange(0, m.rotary_dim, 2, dtype=torch.float32) / m.rotary_dim)
        angles = torch.outer(torch.arange(m.seq_length, dtype=torch.float32), inv_freq).repeat_interleave(2, -1)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        self._init_like_crystal()

    @torch.no_grad()
    def _init_like_crystal(self) -> None:
        """Crystal's muP init (truncated normals; biases 0, norms 1). PyTorch's default init (N(0, 1) embeddings)
        would give logits so large that the softmax gradients are denormal floats, and the tied output layer's
        backward matmuls on them run several times slower on a CPU: not a fair yardstick."""
        i = self.m.init
        for name, param in self.named_parameters():
            if name == "embed.weight":
                std = i.embedding_std
            elif name.endswith(("proj.weight", "down.weight")):
                std = i.output_std
            elif name.endswith(("qkv.weight", "gate_up.weight")):
                std = i.hidden_std
            else:
                is_norm_weight = name.endswith("weight") and name.split(".")[-2].startswith("ln")
                param.fill_(1.0 if is_norm_weight else 0.0)
                continue
            torch.nn.init.trunc_normal_(param, 0.0, std, -i.truncation * std, i.truncation * std)

    def forward(self, tokens, labels):
        x = self.embed(tokens) * self.m.embeddings_scale
        s = tokens.shape[1]
        for block in self.blocks:
            x = block(x, self.cos[:, :s], self.sin[:, :s])
        logits = F.linear(self.ln_f(x), self.embed.weight) * self.m.output_logits_scale
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def time_baseline(m: ModelSection, micro_batch_size: int, microbatches: int, steps: int, warmup: int,
                  precision: str = "fp32", threads: int | None = None) -> dict:
    """Median step time (forward, backward, AdamW) of the plain model on random tokens."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as the trainer does on a CPU (distributed/runtime.py)
    torch.manual_seed(0)
    model = PlainCrystal(m)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-9, weight_decay=0.1)
    tokens = torch.randint(0, m.vocab_size, (micro_batch_size, m.seq_length + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(microbatches):
            with autocast:
                loss = model(tokens[:, :-1], tokens[:, 1:]) / microbatches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[warmup:])
    return {"step_time_s": median, "tokens_per_s": micro_batch_size * microbatches * m.seq_length / median}
