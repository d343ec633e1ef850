"""Packing mixed-modal documents: where BOI/patches/EOI land, the layout, LM targets, flags, errors."""

from __future__ import annotations

import pytest
import torch

from transfusion.layout import IMAGE, PAD, TEXT
from transfusion.packing import IGNORE_INDEX, SpecialTokens, first_fit, pack_documents

SP = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4, image=5)
X = IGNORE_INDEX


def latent(seed: int, c: int = 4, h: int = 4, w: int = 4) -> torch.Tensor:
    return torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed))


def three_docs():
    return [
        [[1, 10, 11], latent(0), [2]],  # caption first: bos a b <BOI> p p p p <EOI> eos
        [[1], latent(1), [12, 13, 2]],  # image first:   bos <BOI> p p p p <EOI> c d eos
        [[20, 21, 22]],  # text only
    ]


def test_tokens_spans_and_layout():
    b = pack_documents(three_docs(), seq_len=14, patch_size=2, special=SP)
    # First-fit: doc 1 (10 tokens) does not fit after doc 0 in row 0; doc 2 (3 tokens) does.
    assert b.doc_spans == [(0, 0, 10), (1, 0, 10), (0, 10, 13)]
    assert b.tokens.tolist() == [
        [1, 10, 11, 3, 5, 5, 5, 5, 4, 2, 20, 21, 22, 0],
        [1, 3, 5, 5, 5, 5, 4, 12, 13, 2, 0, 0, 0, 0],
    ]
    assert b.image_spans == [(0, 4, 8), (1, 2, 6)]
    for r, s, e in b.image_spans:
        assert b.tokens[r, s - 1].item() == SP.boi and b.tokens[r, e].item() == SP.eoi
    assert b.layout.image_spans == (((4, 8),), ((2, 6),))
    assert b.image_first.tolist() == [False, True]
    assert b.image_docs.tolist() == [0, 1]
    assert b.caption_dropped.tolist() == [False, False]
    torch.testing.assert_close(b.latents[0], latent(0))
    torch.testing.assert_close(b.latents[1], latent(1))
    assert b.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 0]

    lay = b.layout
    assert lay.modality[0].tolist() == [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 5 + [PAD]
    assert lay.doc_id[0].tolist() == [0] * 10 + [1] * 3 + [-1]
    # Patches see the whole image (bidirectional) and the document prefix; BOI only the prefix.
    assert (lay.lo[0, 4].item(), lay.hi[0, 4].item()) == (0, 7)
    assert (lay.lo[0, 3].item(), lay.hi[0, 3].item()) == (0, 3)
    assert (lay.lo[0, 11].item(), lay.hi[0, 11].item()) == (10, 11)  # doc 2 cannot see doc 0
    assert lay.valid[1].tolist() == [True] * 10 + [False] * 4
    # Flat patch indices point at the placeholder tokens, in raster order.
    idx = b.patch_index()
    assert idx.tolist() == [[4, 5, 6, 7], [14 + 2, 14 + 3, 14 + 4, 14 + 5]]
    assert bool((b.tokens.reshape(-1)[idx] == SP.image).all())


def test_lm_targets():
    b = pack_documents(three_docs(), seq_len=14, patch_size=2, special=SP)
    assert b.lm_targets.tolist() == [
        # bos->a, a->b, b-><BOI>; no targets from <BOI> or patches; <EOI>->eos; doc 2 separately.
        [10, 11, 3, X, X, X, X, X, 2, X, 21, 22, X, X],
        # bos-><BOI>; <EOI> is never a target; <EOI>->c->d->eos.
        [3, X, X, X, X, X, 12, 13, 2, X, X, X, X, X],
    ]
    assert torch.equal(b.lm_mask, b.lm_targets != X)


def test_caption_dropout_keeps_special_tokens_and_flags():
    g = torch.Generator().manual_seed(0)
    b = pack_documents(three_docs(), seq_len=14, patch_size=2, special=SP, caption_dropout=1.0, generator=g)
    # Doc 0's caption "a b" is dropped (bos kept); doc 1 is image-first, so nothing is dropped.
    assert b.tokens[0, :8].tolist() == [1, 3, 5, 5, 5, 5, 4, 2]
    assert b.caption_dropped.tolist() == [True, False]
    assert b.image_first.tolist() == [False, True]  # a dropped caption does not make the image noise-limited
    none = pack_documents(three_docs(), seq_len=14, patch_size=2, special=SP, caption_dropout=0.0)
    assert none.caption_dropped.tolist() == [False, False]
    # The rate is respected on average.
    docs = [[[1, 10, 11], latent(i)] for i in range(400)]
    many = pack_documents(docs, seq_len=64, patch_size=4, special=SP, caption_dropout=0.25, generator=g)
    assert 0.18 < many.caption_dropped.float().mean().item() < 0.32


def test_first_fit_and_num_rows():
    assert first_fit([5, 6, 3, 2, 4], seq_len=8) == [(0, 0), (1, 0), (0, 5), (1, 6), (2, 0)]
    b = pack_documents([[[7, 8]]], seq_len=4, patch_size=1, special=SP, num_rows=3)
    assert b.tokens.shape == (3, 4) and not b.layout.valid[1:].any()
    assert b.num_images == 0 and b.latents.shape[0] == 0
    with pytest.raises(ValueError, match="num_rows = 1"):
        pack_documents([[[7, 8]], [[9, 9, 9]]], seq_len=4, patch_size=1, special=SP, num_rows=1)


def test_too_long_document_names_index_and_lengths():
    docs = [[[1, 2]], [[1], latent(0), [2]]]  # doc 1: 1 + (1 + 16 + 1) + 1 = 20 tokens at k = 1
    with pytest.raises(ValueError, match=r"documents\[1\] has 20 tokens.*seq_len = 16"):
        pack_documents(docs, seq_len=16, patch_size=1, special=SP)


@pytest.mark.parametrize(
    "doc, match",
    [
        ([[1], latent(0, h=6, w=4)], r"documents\[1\]\[1\].*not divisible by patch_size = 4"),
        ([[1], torch.full((4, 4, 4), float("nan"))], r"documents\[1\]\[1\].*NaN"),
        ([[1], torch.full((4, 4, 4), float("inf"))], r"documents\[1\]\[1\].*Inf"),
        ([[1, 99]], r"documents\[1\]\[0\].*token id 99.*vocab_size = 32"),
        ([[1, -1]], r"token id -1"),
        ([[1], latent(0, c=3)], r"latent shape \(3, 4, 4\) differs"),
        ([[1.5]], r"must be integers"),
        ([[]], r"documents\[1\] is empty"),
    ],
)
def test_bad_documents(doc, match):
    with pytest.raises(ValueError, match=match):
        pack_documents([[[1], latent(9)], doc], seq_len=64, patch_size=4, special=SP, vocab_size=32)
