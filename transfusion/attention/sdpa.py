"""PyTorch scaled_dot_product_attention with the dense mask derived from the layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfusion.attention.registry import Backend, register_backend
from transfusion.layout import AttentionLayout


def _sdpa_mask(layout: AttentionLayout) -> torch.Tensor:
    """Dense mask where padding queries see themselves (no all-False row, hence no NaN); cached per layout."""
    mask = layout.cache.get("sdpa_mask")
    if mask is None:
        mask = layout.dense_mask()
        q_pos = torch.arange(layout.q_offset, layout.kv_len, device=layout.device)
        pad_rows = (~layout.valid).nonzero(as_tuple=True)
        mask[pad_rows[0], pad_rows[1], q_pos[pad_rows[1]]] = True
        mask = mask[:, None]
        layout.cache["sdpa_mask"] = mask
    return mask


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(layout), scale=scale)
    return out * layout.valid[:, None, :, None].to(out.dtype)


register_backend(
    Backend(
        name="sdpa",
        prepare=_sdpa_mask,
        fn=sdpa_attention,
        devices=("cpu", "cuda"),
        dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
        backward_devices=("cpu", "cuda"),
        description="torch scaled_dot_product_attention with a dense boolean mask",
    )
)
