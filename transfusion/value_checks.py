"""Type tests for configuration values. ``bool`` is a subclass of ``int`` in Python, so ``True`` would pass
``isinstance(v, int)``: a count or a scale given as ``True`` is a mistake these tests refuse."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (finite or not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_real(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` and is finite (no nan, no inf)."""
    return is_real(value) and math.isfinite(value)


__all__ = ["is_finite_real", "is_int", "is_real"]
