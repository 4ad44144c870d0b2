"""The SwiGLU activation's single autograd node against the plain expression in float64."""
import pytest
import torch
import torch.nn.functional as F

from megacrystal.kernels.swiglu import swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_the_plain_expression(dtype):
    gen = torch.Generator().manual_seed(0)
    gate_up = (3 * torch.randn(5, 2, 2 * 7, generator=gen)).to(dtype)
    grad = torch.randn(5, 2, 7, generator=gen).to(dtype)
    exact = gate_up.double().requires_grad_()
    gate, up = exact.chunk(2, dim=-1)
    (F.silu(gate) * up).backward(grad.double())
    ours = gate_up.clone().requires_grad_()
    out = swiglu(ours)
    out.backward(grad)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    reference = F.silu(exact[..., :7]) * exact[..., 7:]
    assert out.dtype == dtype and torch.allclose(out.double(), reference, rtol=tolerance, atol=tolerance)
    assert ours.grad.dtype == dtype
    assert torch.allclose(ours.grad.double(), exact.grad, rtol=tolerance, atol=tolerance)
