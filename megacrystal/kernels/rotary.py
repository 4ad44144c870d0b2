"""Crystal's rotary position embedding, applied while the attention core copies q and k to [b, heads, s, d].

Crystal rotates the first 25% of each head's dims in the GPT-J layout: dims (2i, 2i + 1) of the token at
position p turn by the angle p x base^(-2i / rotary_dim) (crystal-spec §1.2), which is the complex product
(x_2i + j x_2i+1) e^(j angle). megatron applies it in SelfAttention with strided slices, a stacked rotate, two
products and a cat per tensor, before the attention core copies q and k into the layout its kernels want anyway;
here one op does both, so the rotation costs no pass of its own (the pass-through dims are copied, the rotated
ones written by one complex multiply, in fp32 for bf16 tensors). `_turned` is the plain real-arithmetic
reference path (also what torch.compile traces).
"""
from __future__ import annotations

import torch


def rotary_angles(seq_length: int, rotary_dim: int, base: float, device=None) -> torch.Tensor:
    """[s, rotary_dim / 2] angles position x base^(-2i / rotary_dim), in fp32 as megatron computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    return torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inv_freq)


def _turned(x: torch.Tensor, angles: torch.Tensor, interleaved: bool, sign: float) -> torch.Tensor:
    """x[..., :r] ([s, b, heads, d]) turned by sign x angles ([s, r/2]), in fp32, with real arithmetic."""
    r = 2 * angles.shape[-1]
    cos, sin = angles.cos()[:, None, None, :], (sign * angles).sin()[:, None, None, :]
    if interleaved:  # pairs (2i, 2i + 1)
        first, second = x[..., :r].float().unflatten(-1, (r // 2, 2)).unbind(-1)
        return torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-1).flatten(-2)
    first, second = x[..., :r // 2].float(), x[..., r // 2:r].float()  # megatron's rotate-half: (i, i + r/2)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _write_rotated(x: torch.Tensor, out: torch.Tensor, angles: torch.Tensor, interleaved: bool, sign: float) -> None:
    """out = x with its first r dims turned by sign x angles; x and out are [s, b, heads, d] (views). Eager, the
    interleaved pairs are one complex multiply (the real arithmetic is six strided kernels)."""
    r = 2 * angles.shape[-1]
    out[..., r:].copy_(x[..., r:])
    if interleaved:
        pairs = torch.view_as_complex(x[..., :r].float().unflatten(-1, (r // 2, 2)).contiguous())
        turn = torch.polar(torch.ones_like(angles), sign * angles)[:, None, None, :]
        out[..., :r].copy_(torch.view_as_real(pairs * turn).flatten(-2))
    else:
        out[..., :r].copy_(_turned(x, angles, interleaved, sign))


class _RotaryToHeadsFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
        s, b, h, d = x.shape
        out = x.new_empty(b, h, s, d)
        _write_rotated(x, out.permute(2, 0, 1, 3), angles, interleaved, 1.0)
        ctx.save_for_backward(angles)
        ctx.interleaved = interleaved
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (angles,) = ctx.saved_tensors
        b, h, s, d = grad.shape
        grad_x = grad.new_empty(s, b, h, d)
        # a rotation's transpose turns back
        _write_rotated(grad.permute(2, 0, 1, 3), grad_x, angles, ctx.interleaved, -1.0)
        return grad_x, None, None


class RotaryEmbedding:
    """Crystal's rotary embedding for the attention core: rotary_dim dims of each head, positions 0..s-1."""

    def __init__(self, rotary_dim: int, base: float, interleaved: bool):
        self.rotary_dim, self.base, self.interleaved = rotary_dim, base, interleaved
        self._angles: torch.Tensor | None = None

    def angles(self, seq_length: int, device) -> torch.Tensor:
        cached = self._angles
        if cached is None or cached.shape[0] < seq_length or cached.device != device:
            cached = self._angles = rotary_angles(seq_length, self.rotary_dim, self.base, device)
        return cached[:seq_length]

    def to_heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, heads, d] (any strides) rotated, as a contiguous [b, heads, s, d] tensor. Under torch.compile
        the real arithmetic, which inductor fuses with the copy (measured faster there than an opaque op)."""
        angles = self.angles(x.shape[0], x.device)
        if torch.compiler.is_compiling():
            r = self.rotary_dim
            rotated = torch.cat((_turned(x, angles, self.interleaved, 1.0).to(x.dtype), x[..., r:]), dim=-1)
            return rotated.permute(1, 2, 0, 3).contiguous()
        return _RotaryToHeadsFirst.apply(x, angles, self.interleaved)
