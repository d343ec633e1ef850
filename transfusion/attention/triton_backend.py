"""Backend ``triton``: our interval flash-attention kernel (kernels/interval_attention.py).

On CUDA it is the fused kernel (forward and backward). Without CUDA it runs only under Triton's CPU
interpreter (``TRITON_INTERPRET=1``, set by ``kernels`` when no GPU is present): correct but slow, meant
for tests, so the backend declares CPU support only in that mode.
"""

from __future__ import annotations

import functools
import os

import torch

from transfusion.attention.registry import Backend, register_backend
from transfusion.layout import AttentionLayout


@functools.cache
def _triton_unavailable() -> str | None:
    try:
        import kernels
    except Exception as e:  # pragma: no cover - the package ships with the repo
        return f"needs the kernels package ({e})"
    if not kernels.HAS_TRITON:
        return "needs triton (pip install triton)"
    from kernels.interval_attention import INTERPRET, interpreter_problem

    return interpreter_problem() if INTERPRET else None  # a Triton / NumPy pair its interpreter cannot run


def key_major_table(layout: AttentionLayout) -> torch.Tensor:
    """The backward pass's key-major tile table of this layout, built once and cached on it (like
    FlexAttention's BlockMask): every layer of a model shares it."""
    cached = layout.cache.get("triton_kv_table")
    if cached is None:
        from kernels.interval_attention import key_major_table as build

        cached = layout.cache["triton_kv_table"] = build(layout.lo, layout.hi, layout.kv_len)
    return cached


def launch_order(layout: AttentionLayout) -> torch.Tensor:
    """The kernels' launch-order table of this layout (heaviest programs first, kernels/work_order.py),
    built once and cached on it."""
    cached = layout.cache.get("triton_order")
    if cached is None:
        from kernels.work_order import work_order

        cached = layout.cache["triton_order"] = work_order(
            layout.lo, layout.hi, layout.kv_len, key_major_table(layout)
        )
    return cached


def prepare_tables(layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything the kernels read besides lo/hi, built once per layout (what the sweep times as the
    mask build)."""
    return key_major_table(layout), launch_order(layout)


def triton_attention(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    from kernels import interval_attention
    from kernels.interval_attention import ORDER_MIN_QUERIES

    # Only a backward pass reads the key-major table, and short query runs (cached decoding builds a
    # layout per step) keep the natural order: inference on short rows builds neither.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    table = key_major_table(layout) if grad else None
    order = launch_order(layout) if q.shape[2] >= ORDER_MIN_QUERIES else None
    return interval_attention(q, k, v, layout.lo, layout.hi, scale=scale, kv_table=table, order=order)


_devices = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
register_backend(
    Backend(
        name="triton",
        fn=triton_attention,
        prepare=prepare_tables,
        devices=_devices,
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        backward_devices=_devices,
        head_dims=(32, 64, 128),
        description="our Triton interval flash attention (fwd+bwd); CPU only under TRITON_INTERPRET=1",
        unavailable_reason=_triton_unavailable,
    )
)
