"""megacrystal: distributed pretraining of LLM360 Crystal-family models on megatron-core."""

__version__ = "0.1.0"
