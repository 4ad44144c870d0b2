"""Parameter count and training FLOPs of a Crystal config, from shapes alone (no allocation)."""
from __future__ import annotations

from ..config.schema import ModelSection


def parameter_count(m: ModelSection) -> int:
    """Unique parameters with tied embeddings (the 7B: 6,575,278,720)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    attention = h * 3 * h + 3 * h + h * h + h
    mlp = 2 * (h * f + f) + f * h + h
    norms = 2 * 2 * h
    return m.num_layers * (attention + mlp + norms) + m.vocab_size * h + 2 * h


def matmul_parameters(m: ModelSection) -> int:
    """Weights of the non-embedding matrix multiplies (what the 6N FLOPs rule counts)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    return m.num_layers * (4 * h * h + 3 * h * f)


def flops_per_token(m: ModelSection) -> float:
    """Training FLOPs per token (forward + backward): 6N + 6Vh for the tied head + 12 L h S for attention."""
    return (6 * matmul_parameters(m) + 6 * m.vocab_size * m.hidden_size
            + 12 * m.num_layers * m.hidden_size * m.seq_length)
