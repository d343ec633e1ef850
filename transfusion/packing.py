"""Packing mixed-modal documents into fixed-length rows.

A document is a list of segments, each either text (a list / 1-D integer tensor of token ids) or an
image (a float latent tensor (C, H, W)). Each image becomes

    <BOI> patch_1 ... patch_n <EOI>          n = (H / k) * (W / k), patches in raster order

so a document like ``[[bos, *caption], latent, [eos]]`` is laid out as
``bos caption <BOI> p_1 .. p_n <EOI> eos``. Documents are placed into rows first-fit in order (a
document goes into the first row with room for all of it; documents are never split) and the rest of
each row is padding. Patch positions hold a placeholder token id (``SpecialTokens.image``); their
inputs are replaced by the image adapter in the model.

Language-model targets (``lm_targets``, -100 = no loss; ``lm_mask`` = where a loss is taken): position
p predicts token p+1 when both are in the same document, p is a text token and p+1 is a text token
that is not an inserted <EOI>. Hence:
    * <BOI> IS a target: the model decides when an image starts.
    * patches are never targets (they get the diffusion loss), and nothing is predicted from a patch.
    * <EOI> is NOT a target: it is inserted deterministically after the n-th patch.
    * the token after <EOI> is predicted from <EOI> (the caption after an image-first image).
    * the last token of a document predicts nothing (documents are independent).

Image-first flag (for noise limiting): an image is "image-first" when no content text token (anything
but the special ids pad/bos/eos/boi/eoi/image) precedes it in its document.

Caption dropout (for classifier-free guidance) happens HERE, in data prep, not in the model: with
probability ``caption_dropout`` the content tokens of the text segment right before a caption-first
image are removed, keeping its special tokens (e.g. a leading BOS), which leaves the "empty caption".
The image-first flag is computed before dropout, so a captionless image is not noise-limited.

A dropped caption-first pair packs as ``<BOS> <BOI> image <EOI> <EOS>``, which is exactly an image-first
pair with an empty caption: trained as is, the model learns that an image-first prefix often ends at once.
``loss_after_dropped_caption=False`` takes no loss on the token after such an image's ``<EOI>``, so the
dropped pairs teach only the unconditional image (the paper's recipe keeps that loss: True).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from transfusion.layout import AttentionLayout
from transfusion.value_checks import is_int

IGNORE_INDEX = -100

Segment = Sequence[int] | torch.Tensor
Document = Sequence[Segment]


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens that packing inserts or recognises (the tokenizer owns their values)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    boi: int = 3
    eoi: int = 4
    image: int = 0  # placeholder id at patch positions (its embedding is never used)

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialTokens:
        """The ids of a ``transfusion.data`` tokenizer (patch placeholders reuse ``<PAD>``)."""
        return cls(
            pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id, boi=tok.boi_id, eoi=tok.eoi_id, image=tok.pad_id
        )

    def ids(self) -> frozenset[int]:
        return frozenset((self.pad, self.bos, self.eos, self.boi, self.eoi, self.image))


@dataclass
class PackedBatch:
    """Rows of packed documents, ready for the Transfusion model.

    Attributes:
        tokens: (B, L) int64 token ids; patch positions hold ``special.image``, padding ``special.pad``.
        positions: (B, L) int64 RoPE positions, counted from each document's start (0 on padding).
        layout: the attention layout (documents, images) of the rows.
        lm_targets: (B, L) int64 next-token targets, ``IGNORE_INDEX`` where no LM loss is taken.
        lm_mask: (B, L) bool, ``lm_targets != IGNORE_INDEX``.
        image_spans: per image, (row, start, end) of its patches (half-open), ordered by (row, start),
            i.e. the same order as ``layout.image_spans`` flattened.
        latents: (N, C, H, W) clean latents of the images, same order.
        image_first: (N,) bool, image precedes any caption text of its document (noise limiting).
        caption_dropped: (N,) bool, this image's caption was removed by caption dropout.
        image_docs: (N,) int64 index of the input document each image came from.
        doc_spans: per input document, (row, start, end) where it landed.
        patch_size: k used to cut the latents into positions.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    layout: AttentionLayout
    lm_targets: torch.Tensor
    lm_mask: torch.Tensor
    image_spans: list[tuple[int, int, int]]
    latents: torch.Tensor
    image_first: torch.Tensor
    caption_dropped: torch.Tensor
    image_docs: torch.Tensor
    doc_spans: list[tuple[int, int, int]]
    patch_size: int
    special: SpecialTokens = field(default_factory=SpecialTokens)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_images(self) -> int:
        return len(self.image_spans)

    def patch_index(self) -> torch.Tensor:
        """(N, n_patches) int64 indices of every image's patch positions in the flattened (B * L) row."""
        if not self.image_spans:
            return torch.zeros(0, 0, dtype=torch.long, device=self.tokens.device)
        L = self.seq_len
        rows = torch.tensor([[r * L + s, e - s] for r, s, e in self.image_spans], device=self.tokens.device)
        n = int(rows[0, 1])
        if bool((rows[:, 1] != n).any()):
            raise ValueError("images in one batch must have the same number of patches")
        return rows[:, :1] + torch.arange(n, device=self.tokens.device)[None]

    def to(self, device: torch.device | str) -> PackedBatch:
        return replace(
            self,
            tokens=self.tokens.to(device),
            positions=self.positions.to(device),
            layout=self.layout.to(device),
            lm_targets=self.lm_targets.to(device),
            lm_mask=self.lm_mask.to(device),
            latents=self.latents.to(device),
            image_first=self.image_first.to(device),
            caption_dropped=self.caption_dropped.to(device),
            image_docs=self.image_docs.to(device),
        )


# ------------------------------------------------------------------ validation and normalisation
def _is_image(seg: object) -> bool:
    return isinstance(seg, torch.Tensor) and seg.is_floating_point()


def _check_document(
    d: int, doc: Document, patch_size: int, vocab_size: int | None
) -> list[list[int] | torch.Tensor]:
    """Segments as int lists (text) or (C, H, W) tensors (images); errors name the document and segment."""
    if isinstance(doc, torch.Tensor) or not isinstance(doc, Sequence) or isinstance(doc, str):
        raise ValueError(f"documents[{d}] must be a list of segments; got {type(doc).__name__}")
    out: list[list[int] | torch.Tensor] = []
    for j, seg in enumerate(doc):
        where = f"documents[{d}][{j}]"
        if _is_image(seg):
            if seg.dim() != 3:
                raise ValueError(f"{where}: image latents must be (C, H, W); got shape {tuple(seg.shape)}")
            _, H, W = seg.shape
            if H % patch_size or W % patch_size:
                raise ValueError(
                    f"{where}: latent (H, W) = ({H}, {W}) is not divisible by patch_size = {patch_size}"
                )
            if not bool(torch.isfinite(seg).all()):
                raise ValueError(f"{where}: latents contain NaN or Inf")
            out.append(seg)
            continue
        ids = text_ids(where, seg, image_kind="a float latent tensor")
        if vocab_size is not None:
            bad = [x for x in ids if not 0 <= x < vocab_size]
            if bad:
                raise ValueError(f"{where}: token id {bad[0]} is outside [0, vocab_size = {vocab_size})")
        out.append(ids)
    return out


def text_ids(where: str, seg: object, image_kind: str) -> list[int]:
    """A text segment (1-D integer tensor or sequence of ints) as a list of ids; ``where`` names it in
    errors, ``image_kind`` says what an image segment would have been (the two families differ)."""
    if isinstance(seg, torch.Tensor):
        if seg.dim() != 1:
            raise ValueError(f"{where}: text token tensor must be 1-D; got shape {tuple(seg.shape)}")
        return [int(x) for x in seg.tolist()]
    if isinstance(seg, Sequence) and not isinstance(seg, str):
        ids = list(seg)
        for x in ids:
            if not is_int(x):
                raise ValueError(f"{where}: text tokens must be integers; got {x!r}")
        return ids
    raise ValueError(f"{where}: segment must be token ids or {image_kind}; got {type(seg).__name__}")


def apply_caption_dropout(
    segments: list[list[int] | torch.Tensor],
    image_first: list[bool],
    p: float,
    special: SpecialTokens,
    generator: torch.Generator | None,
) -> tuple[list[list[int] | torch.Tensor], list[bool]]:
    """Drop the caption before each caption-first image with probability p (keeps special tokens).

    Returns the new segments and, per image, whether its caption was dropped.
    """
    keep_ids = special.ids()
    segments = list(segments)
    dropped: list[bool] = []
    img = 0
    for j, seg in enumerate(segments):
        if not _is_image(seg):
            continue
        drop = False
        if p > 0 and not image_first[img] and j > 0 and not _is_image(segments[j - 1]):
            drop = bool(torch.rand((), generator=generator) < p)
            if drop:
                segments[j - 1] = [x for x in segments[j - 1] if x in keep_ids]
        dropped.append(drop)
        img += 1
    return segments, dropped


def first_fit(lengths: Sequence[int], seq_len: int) -> list[tuple[int, int]]:
    """(row, start) for each length, first-fit in order; a length over ``seq_len`` raises ValueError."""
    used: list[int] = []
    out: list[tuple[int, int]] = []
    for d, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"documents[{d}] has {n} tokens, longer than the row length seq_len = {seq_len}")
        for r, u in enumerate(used):
            if u + n <= seq_len:
                out.append((r, u))
                used[r] += n
                break
        else:
            out.append((len(used), 0))
            used.append(n)
    return out


def pack_documents(
    documents: Sequence[Document],
    seq_len: int,
    patch_size: int,
    special: SpecialTokens | None = None,
    vocab_size: int | None = None,
    caption_dropout: float = 0.0,
    generator: torch.Generator | None = None,
    num_rows: int | None = None,
    loss_after_dropped_caption: bool = True,
) -> PackedBatch:
    """Pack documents into rows of ``seq_len`` tokens (see the module docstring for the rules).

    Args:
        documents: each a list of segments: token id lists (text) or (C, H, W) float latents (images).
            All images of one call must share (C, H, W).
        seq_len: row length L.
        patch_size: k; image latents' H and W must be divisible by it.
        special: special token ids (defaults to ``SpecialTokens()``).
        vocab_size: when given, token ids outside [0, vocab_size) raise ValueError.
        caption_dropout: probability of dropping each caption-first image's caption (classifier-free
            guidance training); ``generator`` drives the draws.
        num_rows: pad the batch with empty rows up to this many (error if the documents need more).
        loss_after_dropped_caption: False: no LM loss on the token after the ``<EOI>`` of an image whose
            caption was dropped (see the module docstring).

    All inputs are checked before anything is built; errors name the document (and segment).
    """
    special = special or SpecialTokens()
    if seq_len <= 0:
        raise ValueError(f"seq_len = {seq_len} must be positive")
    if patch_size <= 0:
        raise ValueError(f"patch_size = {patch_size} must be positive")
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout = {caption_dropout} must be in [0, 1]")
    if len(documents) == 0:
        raise ValueError("documents is empty; nothing to pack")
    content_ids = special.ids()

    docs = [_check_document(d, doc, patch_size, vocab_size) for d, doc in enumerate(documents)]
    image_shape: tuple[int, ...] | None = None
    for d, segs in enumerate(docs):
        for j, seg in enumerate(segs):
            if _is_image(seg):
                if image_shape is None:
                    image_shape = tuple(seg.shape)
                elif tuple(seg.shape) != image_shape:
                    raise ValueError(
                        f"documents[{d}][{j}]: latent shape {tuple(seg.shape)} differs from the batch's "
                        f"first image {image_shape}; one batch needs one latent shape"
                    )

    # Per document: flat token list, kinds (0 text, 1 patch, 2 inserted EOI), local image spans.
    flat: list[
        tuple[list[int], list[int], list[tuple[int, int]], list[bool], list[bool], list[torch.Tensor]]
    ] = []
    for segs in docs:
        firsts: list[bool] = []
        seen_content = False
        for seg in segs:
            if _is_image(seg):
                firsts.append(not seen_content)
            else:
                seen_content = seen_content or any(x not in content_ids for x in seg)
        segs, dropped = apply_caption_dropout(segs, firsts, caption_dropout, special, generator)
        toks: list[int] = []
        kinds: list[int] = []
        spans: list[tuple[int, int]] = []
        lats: list[torch.Tensor] = []
        for seg in segs:
            if _is_image(seg):
                n = (seg.shape[1] // patch_size) * (seg.shape[2] // patch_size)
                toks.append(special.boi)
                kinds.append(0)
                spans.append((len(toks), len(toks) + n))
                toks.extend([special.image] * n)
                kinds.extend([1] * n)
                toks.append(special.eoi)
                kinds.append(2)
                lats.append(seg)
            else:
                toks.extend(seg)
                kinds.extend([0] * len(seg))
        flat.append((toks, kinds, spans, firsts, dropped, lats))
    for d, (toks, *_rest) in enumerate(flat):
        if not toks:
            raise ValueError(f"documents[{d}] is empty (no tokens and no images)")

    placement = first_fit([len(f[0]) for f in flat], seq_len)
    n_rows = 1 + max(r for r, _ in placement)
    if num_rows is not None:
        if n_rows > num_rows:
            raise ValueError(f"the documents need {n_rows} rows of {seq_len} tokens; num_rows = {num_rows}")
        n_rows = num_rows

    tokens = torch.full((n_rows, seq_len), special.pad, dtype=torch.long)
    positions = torch.zeros((n_rows, seq_len), dtype=torch.long)
    kinds_t = torch.full((n_rows, seq_len), -1, dtype=torch.long)  # -1 padding
    doc_spans: list[tuple[int, int, int]] = []
    row_docs: list[list[tuple[int, int]]] = [[] for _ in range(n_rows)]
    images: list[tuple[int, int, int, torch.Tensor, bool, bool, int]] = []
    for d, ((toks, kinds, spans, firsts, dropped, lats), (r, s)) in enumerate(zip(flat, placement)):
        n = len(toks)
        tokens[r, s : s + n] = torch.tensor(toks, dtype=torch.long)
        positions[r, s : s + n] = torch.arange(n)
        kinds_t[r, s : s + n] = torch.tensor(kinds, dtype=torch.long)
        doc_spans.append((r, s, s + n))
        row_docs[r].append((s, s + n))
        for (a, b), first, drop, lat in zip(spans, firsts, dropped, lats):
            images.append((r, s + a, s + b, lat, first, drop, d))
    images.sort(key=lambda im: (im[0], im[1]))

    # LM targets: p -> p+1 inside one document, p text, p+1 text and not an inserted EOI.
    doc_index = torch.full((n_rows, seq_len), -1, dtype=torch.long)
    for d, (r, s, e) in enumerate(doc_spans):
        doc_index[r, s:e] = d
    same_doc = (doc_index[:, :-1] == doc_index[:, 1:]) & (doc_index[:, :-1] >= 0)
    lm_mask = torch.zeros((n_rows, seq_len), dtype=torch.bool)
    lm_mask[:, :-1] = same_doc & (kinds_t[:, :-1] != 1) & (kinds_t[:, 1:] == 0)
    if not loss_after_dropped_caption:
        for r, _, e, _, _, drop, _ in images:
            if drop:
                lm_mask[r, e] = False  # e: the image's <EOI>, whose target is the token after it
    lm_targets = torch.full((n_rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    lm_targets[:, :-1] = torch.where(lm_mask[:, :-1], tokens[:, 1:], IGNORE_INDEX)

    layout = AttentionLayout.stack(
        [
            AttentionLayout.from_spans(
                seq_len, sorted(row_docs[r]), [(s, e) for rr, s, e, *_ in images if rr == r]
            )
            for r in range(n_rows)
        ]
    )
    # Without images there is no latent shape to keep: an empty (0, 0, 0, 0) tensor.
    latents = torch.stack([im[3] for im in images]) if images else torch.zeros((0, 0, 0, 0))
    return PackedBatch(
        tokens=tokens,
        positions=positions,
        layout=layout,
        lm_targets=lm_targets,
        lm_mask=lm_mask,
        image_spans=[(r, s, e) for r, s, e, *_ in images],
        latents=latents,
        image_first=torch.tensor([im[4] for im in images], dtype=torch.bool),
        caption_dropped=torch.tensor([im[5] for im in images], dtype=torch.bool),
        image_docs=torch.tensor([im[6] for im in images], dtype=torch.long),
        doc_spans=doc_spans,
        patch_size=patch_size,
        special=special,
    )


__all__ = [
    "IGNORE_INDEX",
    "Document",
    "PackedBatch",
    "Segment",
    "SpecialTokens",
    "apply_caption_dropout",
    "first_fit",
    "pack_documents",
]
