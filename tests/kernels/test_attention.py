"""megacrystal's CPU causal attention against PyTorch's attention in float64: outputs and q/k/v gradients, a
sequence that is not a multiple of the query block. Under train.compile (flash forward, compiled blockwise
backward) in fp32 and bf16; eager fp32 (blockwise, keeping the probabilities)."""
import pytest
import torch
import torch.nn.functional as F

from megacrystal.kernels import attention


def _relative_error(ours, reference):
    return ((ours.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("dtype, path", [(torch.float32, "compiled"), (torch.bfloat16, "compiled"),
                                           (torch.float32, "keeping_probabilities")])
def test_cpu_attention_matches_float64_attention(dtype, path):
    gen = torch.Generator().manual_seed(0)
    b, heads, s, d = 2, 3, attention.QUERY_BLOCK + 37, 16
    q, k, v = (torch.randn(b, heads, s, d, generator=gen).to(dtype) for _ in range(3))
    grad_out = torch.randn(b, heads, s, d, generator=gen).to(dtype)
    scale = 1.0 / d  # Crystal's muP attention scale

    exact = [t.double().requires_grad_() for t in (q, k, v)]
    exact_out = F.scaled_dot_product_attention(*exact, is_causal=True, scale=scale)
    exact_out.backward(grad_out.double())
    kernel = [t.clone().requires_grad_() for t in (q, k, v)]  # PyTorch's own CPU kernel: the error to match
    F.scaled_dot_product_attention(*kernel, is_causal=True, scale=scale).backward(grad_out)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    if path == "compiled":
        out = attention.causal_attention_cpu(*ours, scale)
    else:
        assert attention.keeps_probabilities(q)
        out = attention.causal_attention_keeping_probabilities(*ours, scale)
    out.backward(grad_out)

    assert out.dtype == dtype and _relative_error(out, exact_out) < (1e-6 if dtype == torch.float32 else 1e-2)
    for name, mine, theirs, reference in zip("qkv", ours, kernel, exact):
        error, kernel_error = _relative_error(mine.grad, reference.grad), _relative_error(theirs.grad, reference.grad)
        assert mine.grad.dtype == dtype
        assert error <= max(2 * kernel_error, 1e-6), (name, error, kernel_error)


def test_probabilities_kept_in_fp32_within_the_budget(monkeypatch):
    q = torch.empty(1, 2, attention.QUERY_BLOCK * 2, 8)
    assert attention.keeps_probabilities(q) and not attention.keeps_probabilities(q.bfloat16())
    kept = 2 * (attention.QUERY_BLOCK ** 2 + attention.QUERY_BLOCK * 2 * attention.QUERY_BLOCK) * 4
    monkeypatch.setattr(attention, "PROBABILITY_BUDGET", kept)
    assert attention.keeps_probabilities(q)
    monkeypatch.setattr(attention, "PROBABILITY_BUDGET", kept - 1)
    assert not attention.keeps_probabilities(q)
