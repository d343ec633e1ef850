"""Interval-masked attention backends behind one call: ``attend(q, k, v, layout, backend=...)``."""

from transfusion.attention import flex, naive, sdpa, triton_backend, xformers_ops  # noqa: F401  (registration)
from transfusion.attention.registry import (
    Backend,
    all_backends,
    attend,
    attention_stand_in,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = [
    "Backend",
    "all_backends",
    "attend",
    "attention_stand_in",
    "available_backends",
    "get_backend",
    "register_backend",
]
