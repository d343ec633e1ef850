"""Training data glue: (captions, image latents) -> an endless, deterministic stream of packed batches.

Each training example is one (caption, image) pair, laid out as one document (paper section 4.1):

    caption-first (probability ``caption_first_prob``, 0.8):  <BOS> caption <BOI> image <EOI> <EOS>
    image-first   (otherwise):                                <BOS> <BOI> image <EOI> caption <EOS>

Caption dropout (classifier-free guidance) removes the caption of a caption-first example with
probability ``caption_dropout`` (0.1); it is applied by ``pack_documents`` and leaves ``<BOS> <BOI>
image <EOI> <EOS>``. Image-first examples are flagged for noise limiting by ``pack_documents``.

The stream is a pure function of ``(seed, position)``:

* example ``i`` is item ``perm_e[i mod n]`` of the dataset, where ``e = i // n`` is the epoch and
  ``perm_e`` a permutation drawn from a generator seeded by ``(seed, e)``; its order (caption- or
  image-first) is drawn from the same generator;
* batch ``b`` starts at the stream's current example and takes the following examples, in order, as long
  as they still fit into ``batch_rows`` rows of ``seq_len`` tokens when placed first-fit (the first one
  that does not fit starts the next batch);
* caption dropout in batch ``b`` draws from a generator seeded by ``(seed, b)``.

So the whole state is two integers (next example, batch index): ``state_dict()`` / ``load_state_dict()``
restore the stream exactly. Every row holds at least one document, and every document one image, so
each row (hence each data-parallel shard of rows) contains images.

``slice_rows`` cuts a global ``PackedBatch`` into the rows of one data-parallel rank; ``pool_latents`` is
a parameter-free latent source (average pooling + a fixed channel mixing) for tests and smoke runs that
do not need a trained autoencoder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from transfusion.packing import PackedBatch, SpecialTokens, pack_documents
from transfusion.value_checks import is_int

CAPTION_FIRST_PROB = 0.8  # paper section 4.1: 80% caption-first, 20% image-first
SPECIALS_PER_DOCUMENT = 4  # BOS, BOI, EOI, EOS

_SALT_EPOCH = 0x7E0C
_SALT_BATCH = 0xBA7C


def mix_seed(*values: int) -> int:
    """A 63-bit seed derived from integers; stable across processes and Python versions (unlike hash())."""
    data = b",".join(str(int(v)).encode() for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class StreamConfig:
    """How examples become packed batches (see the module docstring)."""

    seq_len: int
    batch_rows: int
    patch_size: int
    caption_first_prob: float = CAPTION_FIRST_PROB
    caption_dropout: float = 0.1
    seed: int = 0
    shuffle: bool = True
    loss_after_dropped_caption: bool = True  # see transfusion.packing

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_rows", "patch_size"):
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                raise ValueError(f"{name} = {v!r} must be a positive integer")
        for name in ("caption_first_prob", "caption_dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name} = {v!r} must be in [0, 1]")
        flag = self.loss_after_dropped_caption
        if not isinstance(flag, bool):
            raise ValueError(f"loss_after_dropped_caption = {flag!r} must be a bool")


def document_for(caption: Sequence[int], latent: torch.Tensor, caption_first: bool, special: SpecialTokens):
    """One training document (a list of segments for ``pack_documents``)."""
    if caption_first:
        return [[special.bos, *caption], latent, [special.eos]]
    return [[special.bos], latent, [*caption, special.eos]]


class MixedModalStream:
    """Endless iterator of global ``PackedBatch`` es over (tokenized caption, latent) pairs.

    Args:
        captions: token ids of every example's caption (no special tokens).
        latents: (n, C, H, W) float latents, one per caption, already scaled for diffusion.
        config: sequence length, rows per batch, patch size, recipe probabilities, seed.
        special: special token ids (the tokenizer's).
        vocab_size: when given, every caption token must lie in [0, vocab_size).
    """

    def __init__(
        self,
        captions: Sequence[Sequence[int]],
        latents: torch.Tensor,
        config: StreamConfig,
        special: SpecialTokens | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.config = config
        self.special = special or SpecialTokens()
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or not latents.is_floating_point():
            raise ValueError("latents must be a float tensor (n, C, H, W)")
        if len(captions) != latents.shape[0]:
            raise ValueError(f"{len(captions)} captions but {latents.shape[0]} latents; need one each")
        if len(captions) == 0:
            raise ValueError("the dataset is empty: no (caption, latent) pairs")
        _, _, H, W = latents.shape
        k = config.patch_size
        if H % k or W % k:
            raise ValueError(f"patch_size = {k} does not divide the latent size ({H}, {W})")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents contain NaN or Inf")
        self.captions = [list(map(int, c)) for c in captions]
        if vocab_size is not None:
            for i, c in enumerate(self.captions):
                bad = [t for t in c if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(
                        f"caption {i}: token id {bad[0]} is outside [0, vocab_size = {vocab_size})"
                    )
        self.latents = latents.detach().to("cpu", torch.float32).contiguous()
        self.vocab_size = vocab_size
        self.patches_per_image = (H // k) * (W // k)
        self.lengths = [len(c) + SPECIALS_PER_DOCUMENT + self.patches_per_image for c in self.captions]
        longest = max(self.lengths)
        if longest > config.seq_len:
            i = self.lengths.index(longest)
            raise ValueError(
                f"seq_len = {config.seq_len} is shorter than the longest document ({longest} tokens: caption "
                f"{i} has {len(self.captions[i])} tokens + {self.patches_per_image} image patches + "
                f"{SPECIALS_PER_DOCUMENT} special tokens); raise seq_len or use a shorter tokenization"
            )
        self.next_example = 0
        self.batch_index = 0
        self._epochs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"next_example": self.next_example, "batch_index": self.batch_index, "seed": self.config.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.config.seed)) != self.config.seed:
            raise ValueError(f"stream state has seed {state['seed']}; this stream uses {self.config.seed}")
        self.next_example = int(state["next_example"])
        self.batch_index = int(state["batch_index"])

    # ------------------------------------------------------------------ examples
    def __len__(self) -> int:
        """Number of distinct examples (one epoch)."""
        return len(self.captions)

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch not in self._epochs:
            n = len(self.captions)
            g = torch.Generator().manual_seed(mix_seed(self.config.seed, epoch, _SALT_EPOCH))
            perm = torch.randperm(n, generator=g) if self.config.shuffle else torch.arange(n)
            caption_first = torch.rand(n, generator=g) < self.config.caption_first_prob
            self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = (perm, caption_first)
        return self._epochs[epoch]

    def example(self, i: int) -> tuple[int, bool]:
        """(dataset index, caption_first) of stream example ``i``."""
        n = len(self.captions)
        perm, caption_first = self._epoch(i // n)
        return int(perm[i % n]), bool(caption_first[i % n])

    def document(self, i: int):
        index, caption_first = self.example(i)
        return document_for(self.captions[index], self.latents[index], caption_first, self.special)

    def _take(self, start: int) -> int:
        """How many examples from ``start`` fit, first-fit in order, into one batch's rows."""
        cfg = self.config
        used: list[int] = []
        count = 0
        while True:
            n = self.lengths[self.example(start + count)[0]]
            for r, u in enumerate(used):
                if u + n <= cfg.seq_len:
                    used[r] += n
                    break
            else:
                if len(used) == cfg.batch_rows:
                    return count
                used.append(n)
            count += 1

    # ------------------------------------------------------------------ batches
    def pack(self, docs: list, generator: torch.Generator) -> PackedBatch:
        """Pack one batch's documents into ``batch_rows`` rows, drawing caption dropout from ``generator``.

        The hook a stream over another image representation overrides (with ``document``), keeping the
        example order, batching and random draws of this class (``transfusion.baseline.DiscreteStream``).
        """
        return pack_documents(
            docs,
            seq_len=self.config.seq_len,
            patch_size=self.config.patch_size,
            special=self.special,
            vocab_size=self.vocab_size,
            caption_dropout=self.config.caption_dropout,
            generator=generator,
            num_rows=self.config.batch_rows,
            loss_after_dropped_caption=self.config.loss_after_dropped_caption,
        )

    def batch_at(self, next_example: int, batch_index: int) -> tuple[PackedBatch, int]:
        """The batch starting at example ``next_example`` (with dropout draws of ``batch_index``)."""
        count = self._take(next_example)
        docs = [self.document(next_example + j) for j in range(count)]
        g = torch.Generator().manual_seed(mix_seed(self.config.seed, batch_index, _SALT_BATCH))
        return self.pack(docs, g), count

    def peek(self) -> PackedBatch:
        """The batch ``next()`` will return, without advancing the stream."""
        return self.batch_at(self.next_example, self.batch_index)[0]

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        batch, count = self.batch_at(self.next_example, self.batch_index)
        self.next_example += count
        self.batch_index += 1
        return batch


# ---------------------------------------------------------------------- data parallel
def slice_rows(batch: PackedBatch, start: int, end: int) -> PackedBatch:
    """Rows ``start:end`` of a packed batch as a batch of their own (one data-parallel rank's share).

    Images keep their (row, start) order, so the selected images are a contiguous range of the global
    batch's images; ``image_docs`` and ``doc_spans`` are renumbered to the documents of these rows.
    """
    B = batch.batch_size
    if not 0 <= start < end <= B:
        raise ValueError(f"rows {start}:{end} are not a non-empty range inside the batch's {B} rows")
    lay = batch.layout
    layout = replace(
        lay,
        lo=lay.lo[start:end],
        hi=lay.hi[start:end],
        doc_id=lay.doc_id[start:end],
        image_id=lay.image_id[start:end],
        modality=lay.modality[start:end],
        image_spans=lay.image_spans[start:end],
        cache={},
    )
    img = [i for i, (r, _, _) in enumerate(batch.image_spans) if start <= r < end]
    i0, i1 = (img[0], img[-1] + 1) if img else (0, 0)
    docs = [d for d, (r, _, _) in enumerate(batch.doc_spans) if start <= r < end]
    new_doc = {d: j for j, d in enumerate(docs)}
    image_docs = torch.tensor([new_doc[int(d)] for d in batch.image_docs[i0:i1]], dtype=torch.long)
    latents = batch.latents[i0:i1] if img else batch.latents[:0]
    return replace(
        batch,
        tokens=batch.tokens[start:end],
        positions=batch.positions[start:end],
        layout=layout,
        lm_targets=batch.lm_targets[start:end],
        lm_mask=batch.lm_mask[start:end],
        image_spans=[(r - start, s, e) for r, s, e in batch.image_spans[i0:i1]],
        latents=latents,
        image_first=batch.image_first[i0:i1],
        caption_dropped=batch.caption_dropped[i0:i1],
        image_docs=image_docs.to(batch.image_docs.device),
        doc_spans=[(r - start, s, e) for r, s, e in (batch.doc_spans[d] for d in docs)],
    )


def image_range(batch: PackedBatch, start: int, end: int) -> tuple[int, int]:
    """Half-open range of the global batch's images that lie in rows ``start:end``."""
    rows = [r for r, _, _ in batch.image_spans]
    i0 = sum(1 for r in rows if r < start)
    i1 = sum(1 for r in rows if r < end)
    return i0, i1


def num_tokens(batch: PackedBatch) -> int:
    """Non-padding positions of a batch (text, <BOI>/<EOI> and image patches)."""
    return int(sum(e - s for _, s, e in batch.doc_spans))


# ---------------------------------------------------------------------- a trivial latent source
def pool_latents(images: torch.Tensor, latent_channels: int, latent_size: int, seed: int = 0) -> torch.Tensor:
    """A parameter-free "encoder": average-pool (N, 3, H, W) images to ``latent_size`` and mix the
    colour channels into ``latent_channels`` with a fixed (seeded) matrix with orthonormal columns
    (when ``latent_channels >= 3``). Deterministic; for tests and quick smoke runs only."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % latent_size or W % latent_size:
        raise ValueError(f"latent_size = {latent_size} does not divide the image size ({H}, {W})")
    pooled = F.adaptive_avg_pool2d(images.float(), latent_size)
    c_in = images.shape[1]
    g = torch.Generator().manual_seed(mix_seed(seed, latent_channels, c_in))
    a = torch.randn(max(latent_channels, c_in), c_in, generator=g)
    q, _ = torch.linalg.qr(a)  # (max, c_in) with orthonormal columns
    mixing = q[:latent_channels]
    return torch.einsum("oc,nchw->nohw", mixing, pooled).contiguous()


__all__ = [
    "CAPTION_FIRST_PROB",
    "SPECIALS_PER_DOCUMENT",
    "MixedModalStream",
    "StreamConfig",
    "document_for",
    "image_range",
    "mix_seed",
    "num_tokens",
    "pool_latents",
    "slice_rows",
]
