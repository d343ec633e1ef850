"""Random packed rows for tests: documents with 0-4 images, empty texts, padding gaps; plus the definition.

The definition mask is computed here from the spans alone (same document and (k <= q or same image)),
independently of AttentionLayout, so tests compare the layout against it rather than against itself.
"""

from __future__ import annotations

import random

import torch


def random_row_spans(rng: random.Random, seq_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Docs and image spans for one row: gaps of padding between/after docs, images anywhere in a doc."""
    docs, images = [], []
    pos = rng.choice([0, 0, 0, rng.randint(0, 3)])
    while pos < seq_len:
        length = rng.randint(1, max(1, seq_len // 2))
        end = min(seq_len, pos + length)
        docs.append((pos, end))
        # Images inside [pos, end): up to 4, possibly first or last token, possibly back to back.
        cursor = pos
        for _ in range(rng.randint(0, 4)):
            if cursor >= end:
                break
            start = rng.randint(cursor, end - 1)
            stop = rng.randint(start + 1, min(end, start + 1 + rng.randint(1, 12)))
            images.append((start, stop))
            cursor = stop + rng.choice([0, 1, 1, 2])
        pos = end + rng.choice([0, 0, 1, 3])  # padding gap
        if rng.random() < 0.15:
            break  # trailing padding
    return docs, images


def definition_mask(seq_len: int, docs, images) -> torch.Tensor:
    """(L, L) bool straight from the definition."""
    doc = torch.full((seq_len,), -1)
    img = torch.full((seq_len,), -1)
    for d, (s, e) in enumerate(docs):
        doc[s:e] = d
    for i, (s, e) in enumerate(images):
        img[s:e] = i
    q = torch.arange(seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    same_doc = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    same_img = (img[:, None] == img[None, :]) & (img[:, None] >= 0)
    return same_doc & ((k <= q) | same_img)


def reference_attention(q, k, v, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """float64 softmax attention with a (B, Lq, Lk) bool mask; rows with no key give zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    m = mask[:, None]
    s = s.masked_fill(~m, float("-inf"))
    has = m.any(-1, keepdim=True)
    p = torch.softmax(torch.where(has, s, torch.zeros_like(s)), dim=-1) * has
    return torch.einsum("bhqk,bhkd->bhqd", p, v.double())
