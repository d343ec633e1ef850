"""The decoding context: committed positions of a batch of rows, left-padded to one common length.

Every row holds one document that ends at the common length ``L``; the positions before the row's
document start are padding (empty attention intervals, never attended). That keeps one rule for every
forward pass: new queries sit at absolute positions ``L .. L + n - 1`` of every row, with

    lo = the row's document start       (the whole prefix document is visible)
    hi = the query itself               (text: causal)
    hi = the image's last patch         (image patches: bidirectional inside the image)

and RoPE positions counted from the document start, exactly as ``pack_documents`` numbers a training
document. Rows of different lengths therefore batch together: a shorter row simply has more padding on
its left. When only some rows grow (a subset of rows generates an image), the other rows get padding
prepended (``pad_left``), which keeps the common length; keys are cached after RoPE, so moving a row's
storage does not change its attention.

Two interchangeable modes share all of this:

* ``use_cache=True``: a ``KVCache``; a forward pass runs only the new queries (``layout.queries``-style
  query offset) against the cached keys/values. ``commit=False`` runs look-ahead queries (the denoising
  steps of an image) without storing them.
* ``use_cache=False``: the embedded inputs of the committed positions are kept instead, and every forward
  pass recomputes the whole row (the reference for the cache, and the "no prefix KV reuse" baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transfusion.layout import IMAGE, PAD, TEXT, AttentionLayout
from transfusion.model import KVCache


@dataclass
class QueryFields:
    """Layout fields of ``n`` new queries per row (all (R, n); ``spans``: per row, absolute image spans)."""

    lo: torch.Tensor
    hi: torch.Tensor
    doc_id: torch.Tensor
    image_id: torch.Tensor
    modality: torch.Tensor
    positions: torch.Tensor
    spans: list[list[tuple[int, int]]]

    @property
    def n(self) -> int:
        return self.lo.shape[1]


@dataclass
class Plan:
    """A prepared forward pass (layout + RoPE positions); reusable while the context does not change."""

    fields: QueryFields
    layout: AttentionLayout
    positions: torch.Tensor
    length: int  # the context length it was built for


class DecodeContext:
    """Committed positions of R rows (see the module docstring)."""

    def __init__(self, model, rows: int, use_cache: bool, device: torch.device) -> None:
        self.model = model
        self.use_cache = use_cache
        self.device = device
        self.rows = rows
        i32 = dict(dtype=torch.int32, device=device)
        self.lo = torch.zeros(rows, 0, **i32)
        self.hi = torch.zeros(rows, 0, **i32)
        self.doc_id = torch.zeros(rows, 0, **i32)
        self.image_id = torch.zeros(rows, 0, **i32)
        self.modality = torch.zeros(rows, 0, dtype=torch.int8, device=device)
        self.positions = torch.zeros(rows, 0, dtype=torch.long, device=device)
        self.start = torch.zeros(rows, dtype=torch.long, device=device)  # absolute document start
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
        self.cache: KVCache | None = KVCache(model.cfg.n_layers) if use_cache else None
        self.inputs: torch.Tensor | None = None  # (R, L, dim) embedded inputs, recompute mode

    # ------------------------------------------------------------------ views
    @property
    def length(self) -> int:
        return self.lo.shape[1]

    def doc_lengths(self) -> list[int]:
        return [self.length - int(s) for s in self.start]

    # ------------------------------------------------------------------ query fields
    def text_fields(self, active: torch.Tensor) -> QueryFields:
        """One text query per row at position L; rows where ``active`` is False get a padding query."""
        L = self.length
        q = torch.full((self.rows, 1), L, dtype=torch.int32, device=self.device)
        act = active.to(self.device)[:, None]
        lo = torch.where(act, self.start[:, None].to(torch.int32), q)
        hi = torch.where(act, q, q - 1)
        return QueryFields(
            lo=lo,
            hi=hi,
            doc_id=torch.where(act, 0, -1).to(torch.int32),
            image_id=torch.full_like(q, -1),
            modality=torch.where(act, TEXT, PAD).to(torch.int8),
            positions=torch.where(act, L - self.start[:, None], 0),
            spans=[[] for _ in range(self.rows)],
        )

    def image_fields(self, n_patches: int, image_index: Sequence[int], trailing_text: int = 0) -> QueryFields:
        """``n_patches`` image queries (bidirectional among themselves), then ``trailing_text`` text queries
        (e.g. ``<EOI>``), for every row."""
        L, n, e = self.length, n_patches, trailing_text
        R = self.rows
        q = torch.arange(L, L + n + e, dtype=torch.int32, device=self.device)[None].expand(R, -1)
        is_img = torch.arange(n + e, device=self.device)[None].expand(R, -1) < n
        lo = self.start[:, None].to(torch.int32).expand(R, n + e)
        hi = torch.where(is_img, L + n - 1, q).to(torch.int32)
        img_id = torch.tensor(list(image_index), dtype=torch.int32, device=self.device)[:, None]
        return QueryFields(
            lo=lo.contiguous(),
            hi=hi,
            doc_id=torch.zeros(R, n + e, dtype=torch.int32, device=self.device),
            image_id=torch.where(is_img, img_id, -1).to(torch.int32),
            modality=torch.where(is_img, IMAGE, TEXT).to(torch.int8),
            positions=(q.long() - self.start[:, None]),
            spans=[[(L, L + n)] for _ in range(R)],
        )

    # ------------------------------------------------------------------ forward passes
    def plan(self, f: QueryFields) -> Plan:
        """The layout of a forward pass with queries ``f`` (cache mode: queries only; else whole rows)."""
        n = f.n
        kv_len = self.length + n
        if self.use_cache:
            layout = AttentionLayout(
                lo=f.lo,
                hi=f.hi,
                doc_id=f.doc_id,
                image_id=f.image_id,
                modality=f.modality,
                image_spans=tuple(tuple(s) for s in f.spans),
                kv_len=kv_len,
            )
            positions = f.positions
        else:
            layout = AttentionLayout(
                lo=torch.cat([self.lo, f.lo], 1),
                hi=torch.cat([self.hi, f.hi], 1),
                doc_id=torch.cat([self.doc_id, f.doc_id], 1),
                image_id=torch.cat([self.image_id, f.image_id], 1),
                modality=torch.cat([self.modality, f.modality], 1),
                image_spans=tuple(tuple(a + b) for a, b in zip(self.spans, f.spans)),
                kv_len=kv_len,
            )
            positions = torch.cat([self.positions, f.positions], 1)
        return Plan(fields=f, layout=layout, positions=positions, length=self.length)

    def run(self, x: torch.Tensor, plan: Plan, commit: bool) -> torch.Tensor:
        """Hidden states (R, n, dim) of the new queries with embedded inputs ``x`` (R, n, dim)."""
        if plan.length != self.length:
            raise RuntimeError(f"plan built for length {plan.length}; the context now has {self.length}")
        n = x.shape[1]
        if self.use_cache:
            h = self.model.run_transformer(x, plan.layout, plan.positions, cache=self.cache, commit=commit)
        else:
            full = x if self.inputs is None else torch.cat([self.inputs, x], 1)
            h = self.model.run_transformer(full, plan.layout, plan.positions)[:, -n:]
            if commit:
                self.inputs = full
        if commit:
            f = plan.fields
            self.lo = torch.cat([self.lo, f.lo], 1)
            self.hi = torch.cat([self.hi, f.hi], 1)
            self.doc_id = torch.cat([self.doc_id, f.doc_id], 1)
            self.image_id = torch.cat([self.image_id, f.image_id], 1)
            self.modality = torch.cat([self.modality, f.modality], 1)
            self.positions = torch.cat([self.positions, f.positions], 1)
            self.spans = [a + b for a, b in zip(self.spans, f.spans)]
        return h

    # ------------------------------------------------------------------ reshaping
    def pad_left(self, n: int) -> None:
        """Prepend ``n`` padding positions to every row (absolute indices shift by ``n``)."""
        if n <= 0:
            return
        R, dev = self.rows, self.device
        ar = torch.arange(n, dtype=torch.int32, device=dev)[None].expand(R, n)
        neg = torch.full((R, n), -1, dtype=torch.int32, device=dev)
        self.lo = torch.cat([ar, self.lo + n], 1)
        self.hi = torch.cat([ar - 1, self.hi + n], 1)
        self.doc_id = torch.cat([neg, self.doc_id], 1)
        self.image_id = torch.cat([neg, self.image_id], 1)
        self.modality = torch.cat([torch.full((R, n), PAD, dtype=torch.int8, device=dev), self.modality], 1)
        self.positions = torch.cat([torch.zeros(R, n, dtype=torch.long, device=dev), self.positions], 1)
        self.start = self.start + n
        self.spans = [[(s + n, e + n) for s, e in row] for row in self.spans]
        if self.cache is not None:
            for i in range(len(self.cache.k)):
                k, v = self.cache.k[i], self.cache.v[i]
                if k is None:
                    continue
                z = k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3])
                self.cache.k[i] = torch.cat([z, k], 2)
                self.cache.v[i] = torch.cat([z, v], 2)
        if self.inputs is not None:
            z = self.inputs.new_zeros(R, n, self.inputs.shape[2])
            self.inputs = torch.cat([z, self.inputs], 1)

    def _tensors(self) -> list[str]:
        return ["lo", "hi", "doc_id", "image_id", "modality", "positions", "start"]

    def select(self, rows: Sequence[int]) -> DecodeContext:
        """A copy holding only ``rows`` (in that order)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        out = DecodeContext(self.model, len(rows), self.use_cache, self.device)
        for name in self._tensors():
            setattr(out, name, getattr(self, name).index_select(0, idx))
        out.spans = [list(self.spans[r]) for r in rows]
        if self.cache is not None:
            out.cache.k = [None if k is None else k.index_select(0, idx) for k in self.cache.k]
            out.cache.v = [None if v is None else v.index_select(0, idx) for v in self.cache.v]
        if self.inputs is not None:
            out.inputs = self.inputs.index_select(0, idx)
        return out

    def assign(self, rows: Sequence[int], other: DecodeContext) -> None:
        """Overwrite ``rows`` with the rows of ``other`` (same length, same mode)."""
        if other.length != self.length:
            raise RuntimeError(f"assign: lengths differ ({other.length} vs {self.length})")
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        for name in self._tensors():
            getattr(self, name).index_copy_(0, idx, getattr(other, name))
        for j, r in enumerate(rows):
            self.spans[r] = list(other.spans[j])
        if self.cache is not None:
            for i in range(len(self.cache.k)):
                if self.cache.k[i] is not None:
                    self.cache.k[i] = self.cache.k[i].index_copy(0, idx, other.cache.k[i])
                    self.cache.v[i] = self.cache.v[i].index_copy(0, idx, other.cache.v[i])
        if self.inputs is not None:
            self.inputs = self.inputs.index_copy(0, idx, other.inputs)

    @staticmethod
    def concat(a: DecodeContext, b: DecodeContext) -> DecodeContext:
        """Rows of ``a`` then rows of ``b`` in one context (the shorter is left-padded first)."""
        if a.use_cache != b.use_cache:
            raise RuntimeError("concat: contexts of different modes")
        a = a.select(range(a.rows))  # copies: the originals stay untouched
        b = b.select(range(b.rows))
        a.pad_left(b.length - a.length)
        b.pad_left(a.length - b.length)
        out = DecodeContext(a.model, a.rows + b.rows, a.use_cache, a.device)
        for name in a._tensors():
            setattr(out, name, torch.cat([getattr(a, name), getattr(b, name)], 0))
        out.spans = a.spans + b.spans
        if a.cache is not None:
            out.cache.k = [torch.cat([x, y], 0) for x, y in zip(a.cache.k, b.cache.k)]
            out.cache.v = [torch.cat([x, y], 0) for x, y in zip(a.cache.v, b.cache.v)]
        if a.inputs is not None:
            out.inputs = torch.cat([a.inputs, b.inputs], 0)
        return out


__all__ = ["DecodeContext", "Plan", "QueryFields"]
