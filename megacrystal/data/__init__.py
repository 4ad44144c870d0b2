"""Tokenizer, embedded corpus, preprocessing into indexed datasets, FIM.

Kept import-light on purpose: submodules such as `prepare` pull in megatron-core, so import them directly.
"""

from megacrystal.data.errors import DataError

__all__ = ["DataError"]
