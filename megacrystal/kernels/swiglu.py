"""Crystal's SwiGLU MLP: fc1 -> up * silu(gate) -> fc2, with one autograd node for the activation.

megatron's MLP (without its fusion) runs the gated unit as `torch.chunk` of the biased fc1 output, then
silu(gate) * (up + glu_linear_offset): an extra pass for the 0.0 offset, and autograd's backward for the chunk
is a `torch.cat` of the two halves' gradients, a full copy of the widest activation. Here the gradient of
[gate; up] is written in one tensor, half by half, from the saved silu(gate), which saves that copy. Same
parameters, same math; anything but Crystal's case goes to megatron's forward. `swiglu_reference` is the plain
torch expression.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate, up, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate, up, activated = ctx.saved_tensors
        grad_gate_up = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.ops.aten.silu_backward(grad * up, gate, grad_input=grad_gate)
        torch.mul(grad, activated, out=grad_up)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the last dimension's halves [gate; up]. Under torch.compile the plain expression:
    inductor fuses it and its backward without the copy (and does not trace the out= writes above)."""
    if torch.compiler.is_compiling():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)


class CrystalMLP(MLP):
    """megatron's MLP (same fc1/fc2 parallel linears and parameters) with the SwiGLU above."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        config = self.config
        if (per_token_scale is not None or not config.gated_linear_unit or self.activation_func is not F.silu
                or config.use_te_activation_func or config.bias_activation_fusion
                or config.activation_func_clamp_value is not None or config.glu_linear_offset != 0.0):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        gate_up, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            gate_up = gate_up + bias
        return self.linear_fc2(swiglu(gate_up))


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The torch reference: silu(gate) * up of the last dimension's halves [gate; up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def use_swiglu_mlp(layer) -> None:
    """Turn a TransformerLayer's megatron MLP into CrystalMLP (same parameters and state). Re-classed after
    construction because megatron's TransformerLayer hands its TP group only to an MLP spec whose module is
    exactly MLP (a subclass is built without it, with a warning)."""
    if type(layer.mlp) is MLP:
        layer.mlp.__class__ = CrystalMLP
