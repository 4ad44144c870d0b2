"""Shared test helpers."""
from .ranks import run_on_ranks

__all__ = ["run_on_ranks"]
