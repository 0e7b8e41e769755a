"""Argument validation shared by the CAM methods and the Shapley estimator."""

from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` if it is an int ≥ 1 (or ``None`` when ``optional``), else a short
    ``ValueError`` naming ``name``."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value
