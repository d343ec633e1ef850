"""The reference backend: dense mask derived from the layout, explicit softmax in float32."""

from __future__ import annotations

import torch

from transfusion.attention.registry import Backend, register_backend
from transfusion.layout import AttentionLayout


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float
) -> torch.Tensor:
    mask = layout.dense_mask()[:, None]  # (B, 1, Lq, Lk)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Padding rows have no allowed key: give them a finite row so softmax stays NaN-free, then zero them.
    valid = layout.valid[:, None, :, None]
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1) * valid
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


register_backend(
    Backend(
        name="naive",
        fn=naive_attention,
        devices=("cpu", "cuda"),
        dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
        backward_devices=("cpu", "cuda"),
        description="dense boolean mask, float32 softmax (reference; O(L^2) memory)",
    )
)
