"""Interval-masked attention backends behind one call: ``attend(q, k, v, layout, backend=...)``."""

from transfusion.attention import flex, naive, sdpa, xformers_ops  # noqa: F401  (registration side effects)
from transfusion.attention.registry import (
    Backend,
    all_backends,
    attend,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "all_backends", "attend", "available_backends", "get_backend", "register_backend"]
