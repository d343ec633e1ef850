"""FlexAttention with a BlockMask built directly from the layout's lo/hi vectors.

The BlockMask is made in O(L) from per-block key ranges (no dense mask): for each query block the
keys it may touch span [min lo, max hi] over its rows, and a key block is *full* (flex skips the
mask_mod there) when every row of the query block covers it entirely. The mask_mod, used only on
partial blocks, reads the same two vectors. Built once per layout (cached) and reused by all layers;
flex_attention is compiled once per process.
"""

from __future__ import annotations

import functools

import torch

from transfusion.attention.registry import Backend, register_backend
from transfusion.layout import AttentionLayout

FLEX_BLOCK = 128


def _flex_unavailable() -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch >= 2.11 always has it
        return f"needs torch.nn.attention.flex_attention ({e})"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled graph per shape; a sweep over lengths, head dims and dtypes needs more than the default
    # 8 before dynamo would silently fall back to the (slow) eager path.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def interval_block_mask(layout: AttentionLayout, block: int = FLEX_BLOCK):
    """BlockMask for the layout, built from per-block lo/hi ranges (cached on the layout)."""
    key = ("flex_block_mask", block)
    if key in layout.cache:
        return layout.cache[key]
    from torch.nn.attention.flex_attention import BlockMask

    lo, hi, valid = layout.lo.long(), layout.hi.long(), layout.valid
    B, Lq = lo.shape
    Lk = layout.kv_len
    nq, nk = -(-Lq // block), -(-Lk // block)
    pad = nq * block - Lq
    big = torch.iinfo(torch.int64).max // 4

    def blocked(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, pad), value=fill).view(B, nq, block)

    vb = blocked(valid.long(), 0).bool()
    # Range of keys touched by any valid row of the block; full-block test needs every row valid.
    kmin = torch.where(vb, blocked(lo, big), big).amin(-1)
    kmax = torch.where(vb, blocked(hi, -1), -1).amax(-1)
    all_valid = vb.all(-1)
    lo_max = torch.where(vb, blocked(lo, -1), -1).amax(-1)
    hi_min = torch.where(vb, blocked(hi, big), big).amin(-1)

    kb = torch.arange(nk, device=lo.device)
    k_start, k_end = kb * block, torch.clamp((kb + 1) * block, max=Lk) - 1  # inclusive key ends
    touches = (k_end[None, None] >= kmin[..., None]) & (k_start[None, None] <= kmax[..., None])
    full = (
        all_valid[..., None]
        & (k_start[None, None] >= lo_max[..., None])
        & (k_end[None, None] <= hi_min[..., None])
        & ((kb + 1) * block <= Lk)[None, None]
    )
    if Lq % block:  # the last query block holds rows beyond Lq: never call it full
        full[:, -1] = False
    partial = touches & ~full

    def to_indices(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = sel.sum(-1).to(torch.int32)
        # Selected block indices first (stable sort on the negated selection), rest after.
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return counts[:, None].contiguous(), order[:, None].contiguous()

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    lo32, hi32 = layout.lo, layout.hi

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo32[b, q_idx]) & (kv_idx <= hi32[b, q_idx])

    bm = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Lq, Lk)
    )
    layout.cache[key] = bm
    return bm


def flex_attention_interval(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float
) -> torch.Tensor:
    out = _compiled_flex()(q, k, v, block_mask=interval_block_mask(layout), scale=scale)
    # Fully masked rows come back as zeros from flex; multiply anyway so the contract never depends on it.
    return out * layout.valid[:, None, :, None].to(out.dtype)


register_backend(
    Backend(
        name="flex",
        prepare=interval_block_mask,
        fn=flex_attention_interval,
        devices=("cpu", "cuda"),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        backward_devices=("cuda",),
        description="torch FlexAttention; BlockMask built in O(L) from lo/hi (compiled once)",
        unavailable_reason=_flex_unavailable,
    )
)
