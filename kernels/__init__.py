"""Custom attention kernels for the Transfusion bench.

``interval_attention`` is a Triton flash-attention kernel for the Transfusion mask, given as per-query key
intervals ``lo <= j <= hi``; ``plan_tiles`` counts the tiles it computes (see interval_attention.py).

Without CUDA, Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``) before Triton is imported,
so the kernels run, slowly, on CPU tensors. Without Triton at all, importing this package still works and
the functions raise a RuntimeError saying so.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    HAS_TRITON = False
    _TRITON_ERROR = f"Triton is not importable ({exc}); install it (pip install triton) to use kernels"

    def interval_attention(q, k, v, lo, hi, scale=None):  # type: ignore[no-redef]
        raise RuntimeError(_TRITON_ERROR)

    def plan_tiles(lo, hi, kv_len, block_m, block_n):  # type: ignore[no-redef]
        raise RuntimeError(_TRITON_ERROR)

    def kernel_block_sizes(head_dim, dtype, device, q_len=None, kv_len=None):  # type: ignore[no-redef]
        raise RuntimeError(_TRITON_ERROR)

else:
    HAS_TRITON = True
    from .interval_attention import interval_attention, kernel_block_sizes, plan_tiles

__all__ = ["HAS_TRITON", "interval_attention", "kernel_block_sizes", "plan_tiles"]
