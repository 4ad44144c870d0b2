"""The blockwise cross entropy equals torch's cross entropy on fp32 logits: loss and gradient, fp32 and bf16,
with a row count that is not a multiple of the block."""
import pytest
import torch
import torch.nn.functional as F

from megacrystal.model import cross_entropy


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_loss_and_gradient_match_torch(dtype, tolerance):
    gen = torch.Generator().manual_seed(0)
    s, b, vocab = cross_entropy.ROWS_PER_BLOCK + 5, 3, 1000
    logits = (4 * torch.randn(s, b, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (s, b), generator=gen)
    weight = torch.rand(s, b, generator=gen)  # a different gradient per token (as a loss mask would give)

    ours_in = logits.clone().requires_grad_()
    ours = cross_entropy.vocab_parallel_cross_entropy(ours_in * 1, target)  # not a leaf: backward reuses it
    (ours * weight).sum().backward()
    leaf = logits.clone().requires_grad_()  # a leaf: backward allocates the gradient and leaves it alone
    (cross_entropy.vocab_parallel_cross_entropy(leaf, target) * weight).sum().backward()
    assert torch.equal(leaf, logits) and torch.equal(leaf.grad, ours_in.grad)
    ref_in = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_in.view(-1, vocab), target.view(-1), reduction="none").view(s, b)
    (ref * weight).sum().backward()

    assert ours.dtype == torch.float32 and ours_in.grad.dtype == dtype
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-5)  # the loss is computed in fp32 either way
    assert (ours_in.grad.float() - ref_in.grad).abs().max() <= tolerance * ref_in.grad.abs().max()
