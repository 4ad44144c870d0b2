"""The blockwise cross entropy equals torch's cross entropy on fp32 logits: loss and gradient, fp32 and bf16,
with a row count that is not a multiple of the block."""
import pytest
import torch
import torch.nn.functional as F

from megacrystal.kernels import cross_entropy


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_loss_and_gradient_match_torch(dtype, tolerance, compiled):
    gen = torch.Generator().manual_seed(0)
    s, b, vocab = cross_entropy.ROWS_PER_BLOCK + 5, 3, 1000
    logits = (4 * torch.randn(s, b, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (s, b), generator=gen)
    weight = torch.rand(s, b, generator=gen)  # a different gradient per token (as a loss mask would give)

    ours_in = logits.clone().requires_grad_()
    ours = cross_entropy.vocab_parallel_cross_entropy(ours_in * 1, target, compiled=compiled)  # not a leaf
    (ours * weight).sum().backward()
    leaf = logits.clone().requires_grad_()  # a leaf: backward allocates the gradient and leaves it alone
    (cross_entropy.vocab_parallel_cross_entropy(leaf, target, compiled=compiled) * weight).sum().backward()
    assert torch.equal(leaf, logits) and torch.equal(leaf.grad, ours_in.grad)
    ref_in = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_in.view(-1, vocab), target.view(-1), reduction="none").view(s, b)
    (ref * weight).sum().backward()

    assert ours.dtype == torch.float32 and ours_in.grad.dtype == dtype
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-5)  # the loss is computed in fp32 either way
    assert (ours_in.grad.float() - ref_in.grad).abs().max() <= tolerance * ref_in.grad.abs().max()
    # the target column's (p - 1) x weight is rounded once, from fp32: within one rounding of torch's
    picked = ours_in.grad.view(-1, vocab).gather(1, target.view(-1, 1)).float()
    expected = ref_in.grad.view(-1, vocab).gather(1, target.view(-1, 1))
    assert torch.allclose(picked, expected, rtol=2**-8 if dtype == torch.bfloat16 else 1e-5, atol=0)
