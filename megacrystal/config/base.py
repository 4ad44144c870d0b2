"""Shared pieces of the schema: strict sections and cross-field checks that name their field."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def require(ok: bool, field: str, message: str) -> None:
    """Fail validation with `field: message` unless `ok` (loader.py turns it into a one-line ConfigError)."""
    if not ok:
        raise ValueError(f"@{field}: {message}")
