"""Deterministic benchmark layouts: packed rows of mixed-modal documents with a chosen image share."""

from __future__ import annotations

import torch

from transfusion.layout import AttentionLayout


def document_spans(
    seq_len: int, image_tokens: int, image_fraction: float, doc_tokens: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """One row: documents of ``doc_tokens`` tokens, each with images of ``image_tokens`` patches making up
    about ``image_fraction`` of it, separated by equal text gaps (captions, <BOI>/<EOI>)."""
    if not 0.0 <= image_fraction < 1.0:
        raise ValueError(f"image_fraction = {image_fraction} must be in [0, 1)")
    docs, images = [], []
    for start in range(0, seq_len, doc_tokens):
        end = min(seq_len, start + doc_tokens)
        docs.append((start, end))
        n_img = int(round(image_fraction * (end - start) / image_tokens)) if image_tokens else 0
        n_img = min(n_img, (end - start) // (image_tokens + 1)) if image_tokens else 0
        if n_img == 0:
            continue
        gap = (end - start - n_img * image_tokens) // (n_img + 1)
        pos = start + gap
        for _ in range(n_img):
            images.append((pos, pos + image_tokens))
            pos += image_tokens + gap
    return docs, images


def benchmark_layout(
    batch: int,
    seq_len: int,
    image_tokens: int = 256,
    image_fraction: float = 0.5,
    doc_tokens: int | None = None,
    device: str | torch.device = "cpu",
) -> AttentionLayout:
    """A batch of identical-shape rows; rows alternate the document phase so their layouts differ."""
    doc_tokens = doc_tokens or min(seq_len, 2048)
    rows = []
    for b in range(batch):
        docs, images = document_spans(seq_len, image_tokens, image_fraction, doc_tokens)
        if b % 2 and len(docs) == 1 and images:
            # Second layout for odd rows: shift the images by half a gap so rows are not all alike.
            shift = min(images[0][0] // 2, seq_len - images[-1][1])
            images = [(s + shift, e + shift) for s, e in images]
        rows.append(AttentionLayout.from_spans(seq_len, docs, images))
    return AttentionLayout.stack(rows).to(device)
