"""``loss_after_dropped_caption=False``: no LM loss on the token after a caption-dropped image's <EOI>, in
both families' packing, and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from tests.test_baseline import SP, TEXT_V, VOCAB, codes
from transfusion.baseline import pack_discrete_documents
from transfusion.config import ModelConfig
from transfusion.packing import IGNORE_INDEX, pack_documents
from transfusion.training_data import StreamConfig

GRID = 4


def _documents(seed: int, latents: bool) -> list:
    """Caption-first pairs (droppable), image-first pairs (never dropped) and a text document, mixed."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(10):
        image = torch.randn(4, GRID, GRID, generator=g) if latents else codes(g)
        caption = torch.randint(6, TEXT_V, (3 + i % 3,), generator=g).tolist()
        if i % 3 == 2:
            docs.append([[SP.bos], image, [*caption, SP.eos]])  # image-first
        else:
            docs.append([[SP.bos, *caption], image, [SP.eos]])  # caption-first
    docs.append([[SP.bos, 7, 8, 9, SP.eos]])
    return docs


def _eoi_positions(batch) -> list[tuple[int, int]]:
    """(row, position) of every <EOI>, documents in input order, images in order within each."""
    out = []
    for r, s, e in batch.doc_spans:
        out += [(r, s + int(p)) for p in torch.nonzero(batch.tokens[r, s:e] == SP.eoi).flatten()]
    return out


@pytest.mark.parametrize("family", ["transfusion", "discrete"])
def test_only_the_target_after_a_dropped_images_eoi_goes(family):
    def pack(flag: bool):
        gen = torch.Generator().manual_seed(11)  # the same dropout draws for both
        if family == "transfusion":
            docs = _documents(0, latents=True)
            return pack_documents(
                docs, 64, 2, SP, caption_dropout=0.5, generator=gen, loss_after_dropped_caption=flag
            )
        docs = _documents(0, latents=False)
        return pack_discrete_documents(
            docs, 64, VOCAB, SP, caption_dropout=0.5, generator=gen, loss_after_dropped_caption=flag
        )

    kept, cut = pack(True), pack(False)
    assert torch.equal(kept.tokens, cut.tokens)
    # which images lost their caption: an image whose <EOI> follows a document opening "<BOS> <BOI>" with
    # a caption-first original, i.e. a dropped pair (image-first pairs never drop); read from the tokens
    eois = _eoi_positions(kept)
    assert len(eois) == 10
    dropped = []
    for i, (r, _) in enumerate(eois):
        s = kept.doc_spans[i][1]
        caption_first = i % 3 != 2
        dropped.append(caption_first and int(kept.tokens[r, s + 1]) == SP.boi)
    assert 0 < sum(dropped) < sum(i % 3 != 2 for i in range(10))  # some dropped, some kept
    expected = kept.lm_mask.clone()
    for (r, p), d in zip(eois, dropped):
        assert kept.lm_mask[r, p] and int(kept.lm_targets[r, p]) == int(kept.tokens[r, p + 1])
        if d:
            assert int(kept.tokens[r, p + 1]) == SP.eos  # the "empty caption" the flag stops teaching
            expected[r, p] = False
    assert torch.equal(cut.lm_mask, expected)
    assert torch.equal(cut.lm_targets, torch.where(expected, kept.lm_targets, IGNORE_INDEX))


def test_the_switch_is_checked_and_reaches_the_stream():
    with pytest.raises(
        ValueError, match="ModelConfig.loss_after_dropped_caption = 'no' must be true or false"
    ):
        ModelConfig(loss_after_dropped_caption="no")
    with pytest.raises(ValueError, match="loss_after_dropped_caption = 0 must be a bool"):
        StreamConfig(seq_len=8, batch_rows=1, patch_size=1, loss_after_dropped_caption=0)
    from transfusion.run_data import stream_config
    from transfusion.train import TrainConfig

    mc = ModelConfig(loss_after_dropped_caption=False)
    assert stream_config(TrainConfig(), mc, 2).loss_after_dropped_caption is False
    assert stream_config(TrainConfig(), ModelConfig(), 2).loss_after_dropped_caption is True
