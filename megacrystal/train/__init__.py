"""The training loop, metrics, progress reporting (and, later, checkpoints and signals)."""
