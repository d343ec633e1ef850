"""The interval attention layout: the single source of truth for who attends to whom.

In a packed row of mixed-modal documents, query ``q`` may attend key ``k`` iff both lie in the same
document and (``k <= q`` or both lie in the same image). Documents and images are contiguous spans, so
the allowed keys of every query form one interval ``lo[q] <= k <= hi[q]``:

    lo[q] = start of q's document
    hi[q] = q                         for text tokens (<BOI> and <EOI> are text tokens)
    hi[q] = last patch of q's image   for image patches

Padding tokens (outside every document) get the empty interval ``lo = q, hi = q - 1``; that choice
keeps both vectors non-decreasing over the whole row, which kernels use to bound their loops.

Every attention backend consumes ``lo``/``hi``; the dense mask is only ever derived from them.
Decoding uses a query offset: the queries are the last ``Lq`` positions of ``kv_len`` keys, and
``lo``/``hi`` keep absolute key indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

TEXT, IMAGE, PAD = 0, 1, 2
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", PAD: "pad"}

Span = tuple[int, int]


def _check_spans(name: str, spans: Sequence[Span], seq_len: int) -> list[Span]:
    """Half-open spans, each non-empty, inside [0, seq_len), sorted and non-overlapping."""
    out: list[Span] = []
    for i, span in enumerate(spans):
        if len(span) != 2:
            raise ValueError(f"{name}[{i}] = {span!r} is not a (start, end) pair")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end:
            raise ValueError(f"{name}[{i}] = ({start}, {end}) is empty or negative; need 0 <= start < end")
        if end > seq_len:
            raise ValueError(f"{name}[{i}] = ({start}, {end}) runs past seq_len = {seq_len}")
        if out and start < out[-1][1]:
            prev = out[-1]
            kind = "overlaps" if start >= prev[0] else "is not sorted after"
            raise ValueError(f"{name}[{i}] = ({start}, {end}) {kind} {name}[{i - 1}] = {prev}")
        out.append((start, end))
    return out


@dataclass(frozen=True, eq=False)
class AttentionLayout:
    """A batch of packed rows, described by per-query key intervals.

    Attributes:
        lo, hi: (B, Lq) int32, inclusive absolute key indices; ``hi < lo`` means padding.
        doc_id: (B, Lq) int32 document index within the row, -1 for padding.
        image_id: (B, Lq) int32 image index within the row, -1 outside images.
        modality: (B, Lq) int8, ``TEXT`` / ``IMAGE`` / ``PAD``.
        image_spans: per row, the half-open (start, end) spans of its images (absolute positions).
        kv_len: number of keys; queries are positions ``q_offset .. kv_len - 1``.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    doc_id: torch.Tensor
    image_id: torch.Tensor
    modality: torch.Tensor
    image_spans: tuple[tuple[Span, ...], ...]
    kv_len: int
    # Per-layout cache for derived objects (FlexAttention BlockMask, tile plans); never compared.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- constructors
    @staticmethod
    def from_spans(
        seq_len: int, docs: Sequence[Span], images: Sequence[Span] = (), device: torch.device | str = "cpu"
    ) -> AttentionLayout:
        """One row of ``seq_len`` tokens; tokens outside every doc are padding.

        ``images`` spans cover patches only (``<BOI>``/``<EOI>`` are text tokens of the document).
        """
        if int(seq_len) <= 0:
            raise ValueError(f"seq_len = {seq_len} must be positive")
        docs = _check_spans("docs", docs, seq_len)
        images = _check_spans("images", images, seq_len)
        pos = torch.arange(seq_len, dtype=torch.int32)
        lo, hi = pos.clone(), pos - 1  # padding: empty interval at its own position
        doc_id = torch.full((seq_len,), -1, dtype=torch.int32)
        image_id = torch.full((seq_len,), -1, dtype=torch.int32)
        modality = torch.full((seq_len,), PAD, dtype=torch.int8)
        for d, (start, end) in enumerate(docs):
            lo[start:end] = start
            hi[start:end] = pos[start:end]
            doc_id[start:end] = d
            modality[start:end] = TEXT
        for i, (start, end) in enumerate(images):
            owner = [d for d, (ds, de) in enumerate(docs) if ds <= start and end <= de]
            if not owner:
                raise ValueError(f"images[{i}] = ({start}, {end}) does not lie inside one document of {docs}")
            hi[start:end] = end - 1
            image_id[start:end] = i
            modality[start:end] = IMAGE
        dev = torch.device(device)
        return AttentionLayout(
            lo=lo[None].to(dev),
            hi=hi[None].to(dev),
            doc_id=doc_id[None].to(dev),
            image_id=image_id[None].to(dev),
            modality=modality[None].to(dev),
            image_spans=(tuple(images),),
            kv_len=int(seq_len),
        )

    @staticmethod
    def stack(rows: Sequence[AttentionLayout]) -> AttentionLayout:
        """Concatenate layouts along the batch axis; they must share length and query offset."""
        if not rows:
            raise ValueError("stack() needs at least one layout")
        first = rows[0]
        for i, r in enumerate(rows):
            if r.kv_len != first.kv_len or r.q_len != first.q_len:
                raise ValueError(
                    f"rows[{i}] has (kv_len, q_len) = ({r.kv_len}, {r.q_len}); rows[0] has "
                    f"({first.kv_len}, {first.q_len})"
                )
        return AttentionLayout(
            lo=torch.cat([r.lo for r in rows]),
            hi=torch.cat([r.hi for r in rows]),
            doc_id=torch.cat([r.doc_id for r in rows]),
            image_id=torch.cat([r.image_id for r in rows]),
            modality=torch.cat([r.modality for r in rows]),
            image_spans=tuple(s for r in rows for s in r.image_spans),
            kv_len=first.kv_len,
        )

    # ---------------------------------------------------------------- views
    @property
    def batch_size(self) -> int:
        return self.lo.shape[0]

    @property
    def q_len(self) -> int:
        return self.lo.shape[1]

    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def device(self) -> torch.device:
        return self.lo.device

    @property
    def valid(self) -> torch.Tensor:
        """(B, Lq) bool: queries with a non-empty interval (not padding)."""
        return self.hi >= self.lo

    def to(self, device: torch.device | str) -> AttentionLayout:
        if torch.device(device) == self.device:
            return self
        return replace(
            self,
            lo=self.lo.to(device),
            hi=self.hi.to(device),
            doc_id=self.doc_id.to(device),
            image_id=self.image_id.to(device),
            modality=self.modality.to(device),
            cache={},
        )

    def queries(self, start: int) -> AttentionLayout:
        """The same keys, with only the queries at absolute positions ``start ..`` (decoding)."""
        first = start - self.q_offset
        if not 0 <= first < self.q_len:
            raise ValueError(
                f"start = {start} is outside the query positions {self.q_offset}..{self.kv_len - 1}"
            )
        return replace(
            self,
            lo=self.lo[:, first:],
            hi=self.hi[:, first:],
            doc_id=self.doc_id[:, first:],
            image_id=self.image_id[:, first:],
            modality=self.modality[:, first:],
            cache={},
        )

    def causal_only(self) -> AttentionLayout:
        """The ablation without bidirectional intra-image attention: hi = q for every real token."""
        pos = torch.arange(self.q_offset, self.kv_len, dtype=torch.int32, device=self.device).expand_as(
            self.hi
        )
        hi = torch.where(self.valid, pos, self.hi)
        return replace(self, hi=hi, cache={})

    # ---------------------------------------------------------------- derived quantities
    def dense_mask(self) -> torch.Tensor:
        """(B, Lq, kv_len) bool: True where query may attend key. O(L^2): for references and small runs."""
        k = torch.arange(self.kv_len, device=self.device, dtype=torch.int32)
        return (k[None, None, :] >= self.lo[:, :, None]) & (k[None, None, :] <= self.hi[:, :, None])

    def allowed_pairs(self) -> torch.Tensor:
        """(B,) int64: number of allowed (query, key) pairs per row (attention FLOP accounting)."""
        return (self.hi.long() - self.lo.long() + 1).clamp_min(0).sum(dim=1)

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        shape = tuple(self.lo.shape)
        if self.lo.dim() != 2:
            raise ValueError(f"lo must be (batch, q_len); got shape {shape}")
        for name in ("hi", "doc_id", "image_id", "modality"):
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; lo has {shape}")
        for name in ("lo", "hi"):
            t = getattr(self, name)
            if t.dtype != torch.int32:
                raise ValueError(f"{name} must be int32; got {t.dtype}")
        if len(self.image_spans) != shape[0]:
            raise ValueError(f"image_spans has {len(self.image_spans)} rows; lo has {shape[0]}")
        if not 0 < shape[1] <= self.kv_len:
            raise ValueError(f"q_len = {shape[1]} must be in 1..kv_len = {self.kv_len}")
        if shape[1] > 1:
            for name in ("lo", "hi"):
                t = getattr(self, name)
                bad = (t[:, 1:] < t[:, :-1]).nonzero()
                if len(bad):
                    b, i = bad[0].tolist()
                    raise ValueError(
                        f"{name} is not non-decreasing: row {b}, query {i + 1} has {name} = "
                        f"{int(t[b, i + 1])} < {int(t[b, i])} at query {i}"
                    )
        valid = self.hi >= self.lo
        if valid.any():
            if int(self.lo[valid].min()) < 0 or int(self.hi[valid].max()) >= self.kv_len:
                raise ValueError(f"lo/hi of real tokens must lie in [0, kv_len = {self.kv_len})")
            pos = torch.arange(self.q_offset, self.kv_len, device=self.device).expand_as(self.lo)
            if bool((valid & (self.lo > pos)).any()):
                raise ValueError("a real token's lo lies after the token itself (it cannot see itself)")
