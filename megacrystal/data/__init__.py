"""Tokenizer, embedded corpus, preprocessing into indexed datasets, FIM.

Kept import-light on purpose (the prepare path imports no torch): import the submodules directly.
"""

from megacrystal.data.errors import DataError

__all__ = ["DataError"]
