"""The attention core's rotary op against the spec's formulas in float64 (tests/model/reference.rope): the
rotated [b, heads, s, d] layout and the gradient, both layouts, fp32 and bf16, from a strided input."""
import pytest
import torch

from megacrystal.kernels.rotary import RotaryEmbedding

from tests.model.reference import rope


@pytest.mark.parametrize("interleaved", [True, False], ids=["gpt-j", "rotate-half"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rotary_to_heads_first_matches_the_formula(interleaved, dtype, tolerance):
    gen = torch.Generator().manual_seed(0)
    s, b, heads, d, rotary_dim = 37, 2, 3, 16, 4
    qkv = torch.randn(s, b, heads, 3 * d, generator=gen).to(dtype)  # q is a strided view, as megatron's split
    grad = torch.randn(b, heads, s, d, generator=gen).to(dtype)

    exact_in = qkv[..., :d].double().requires_grad_()
    exact = rope(exact_in.transpose(0, 1), rotary_dim, 10000.0, interleaved).permute(0, 2, 1, 3)
    exact.backward(grad.double())
    ours_in = qkv.clone().requires_grad_()
    ours = RotaryEmbedding(rotary_dim, 10000.0, interleaved).to_heads_first(ours_in[..., :d])
    ours.backward(grad)

    assert ours.shape == (b, heads, s, d) and ours.is_contiguous() and ours.dtype == dtype
    assert torch.allclose(ours.double(), exact, rtol=tolerance, atol=tolerance)
    assert torch.equal(ours[..., rotary_dim:], qkv[..., rotary_dim:d].permute(1, 2, 0, 3))  # passed through
    assert torch.allclose(ours_in.grad[..., :d].double(), exact_in.grad, rtol=tolerance, atol=tolerance)
    assert not ours_in.grad[..., d:].any()
