"""transfusion.eval: judge-based alignment / captioning accuracy and text bits per byte."""

import math

import numpy as np
import pytest
import torch

from transfusion.data import ByteTokenizer, bits_per_byte, get_dataset, utf8_len
from transfusion.eval import (
    bits_per_byte_of_texts,
    caption_accuracy,
    model_logits_fn,
    text_nll,
    text_to_image_alignment,
)


@pytest.fixture(scope="module")
def test_items():
    ds = get_dataset("shapes", "test")
    return [ds[i] for i in range(48)]


def _shift(xs):
    return xs[1:] + xs[:1]


# ---------------------------------------------------------------------- alignment
def test_ground_truth_images_align_with_their_own_captions(test_items):
    images = torch.stack([it["image"] for it in test_items])
    captions = [it["caption"] for it in test_items]
    res = text_to_image_alignment(images, captions)
    assert res.n == len(test_items)
    assert res.score >= 0.99
    assert res.exact >= 0.99
    assert all(v is None or v >= 0.99 for v in res.per_attribute.values())
    assert len(res.scores) == res.n and "scores" not in res.as_dict()


def test_shuffled_captions_align_much_worse(test_items):
    images = torch.stack([it["image"] for it in test_items])
    captions = [it["caption"] for it in test_items]
    res = text_to_image_alignment(images, _shift(captions))
    assert res.score < 0.5
    assert res.exact < 0.2


def test_alignment_accepts_uint8_hwc_arrays_and_lists(test_items):
    captions = [it["caption"] for it in test_items[:8]]
    hwc = np.stack(
        [((it["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy() for it in test_items[:8]]
    )
    assert text_to_image_alignment(hwc, captions).score >= 0.99
    assert text_to_image_alignment([it["image"] for it in test_items[:8]], captions).score >= 0.99


def test_alignment_of_a_blank_image_is_zero(test_items):
    blank = -torch.ones(4, 3, 32, 32)  # black: no objects
    res = text_to_image_alignment(blank, [it["caption"] for it in test_items[:4]])
    assert res.score == 0.0


def test_captioning_accuracy_of_true_and_shuffled_captions(test_items):
    captions = [it["caption"] for it in test_items]
    objects = [it["objects"] for it in test_items]
    assert caption_accuracy(captions, objects).score == pytest.approx(1.0)
    # against the image (parsed by the judge) instead of the ground-truth objects
    images = torch.stack([it["image"] for it in test_items])
    assert caption_accuracy(captions, images).score >= 0.99
    shuffled = caption_accuracy(_shift(captions), objects)
    assert shuffled.score < 0.5
    assert caption_accuracy([""] * len(objects), objects).score == 0.0


def test_mismatched_lengths_are_rejected(test_items):
    images = torch.stack([it["image"] for it in test_items[:3]])
    with pytest.raises(ValueError):
        text_to_image_alignment(images, ["a red circle"] * 2)
    with pytest.raises(ValueError):
        caption_accuracy(["a red circle"], [it["objects"] for it in test_items[:2]])


# ---------------------------------------------------------------------- bits per byte
def test_uniform_model_bits_per_byte_is_log2_vocab_times_tokens_per_byte():
    tok = ByteTokenizer()
    V = 300
    uniform = lambda tokens, pads: torch.zeros(*tokens.shape, V)
    texts = ["a small red circle", "there is a large blue square at the top left", "héllo wörld"]
    res = bits_per_byte_of_texts(uniform, tok, texts, batch_size=2)
    n_tok = sum(len(tok.encode(t)) for t in texts)
    n_bytes = sum(utf8_len(t) for t in texts)
    assert res.n_tokens == n_tok and res.n_bytes == n_bytes
    assert res.bits_per_byte == pytest.approx(math.log2(V) * n_tok / n_bytes, rel=1e-6)
    assert res.nats_per_token == pytest.approx(math.log(V), rel=1e-6)
    # byte tokens: one token per byte, so bits per byte is log2(V) exactly
    assert n_tok == n_bytes
    # vocab_limit restricts the softmax
    limited = bits_per_byte_of_texts(uniform, tok, texts, vocab_limit=tok.vocab_size)
    assert limited.bits_per_byte == pytest.approx(math.log2(tok.vocab_size), rel=1e-6)


def test_bits_per_byte_of_a_model_that_knows_the_text_is_near_zero():
    tok = ByteTokenizer()
    text = "a large green cross in the center"
    ids = [tok.bos_id, *tok.encode(text)]

    def oracle(tokens, pads):  # puts all mass on the true next token of `text`
        B, L = tokens.shape
        out = torch.full((B, L, tok.vocab_size), -1e4)
        for b in range(B):
            start = int(pads[b])
            for j in range(start, L - 1):
                out[b, j, ids[j - start + 1]] = 0.0
        return out

    res = bits_per_byte_of_texts(oracle, tok, [text, text[:10]], batch_size=2)
    assert res.bits_per_byte < 1e-6


def test_text_nll_only_scores_real_tokens_and_matches_cross_entropy():
    torch.manual_seed(0)
    V = 40
    table = torch.randn(V, V)
    logits_fn = lambda tokens, pads: table[tokens]  # a bigram model
    rows = [[5, 6, 7, 8], [9], [10, 11]]
    nll, n = text_nll(logits_fn, rows, bos_id=1, pad_id=0, batch_size=8)
    assert n == 7
    ref = 0.0
    for r in rows:
        seq = torch.tensor([1, *r])
        ref += float(torch.nn.functional.cross_entropy(table[seq[:-1]], seq[1:], reduction="sum"))
    assert nll == pytest.approx(ref, rel=1e-6)
    # batching (and thus padding) does not change the result
    nll1, _ = text_nll(logits_fn, rows, bos_id=1, pad_id=0, batch_size=1)
    assert nll1 == pytest.approx(nll, rel=1e-6)
    assert bits_per_byte(nll, 10) == pytest.approx(nll / (math.log(2) * 10))


@pytest.mark.parametrize("family", ["transfusion", "discrete"])
def test_model_logits_fn_is_padding_invariant(family):
    from transfusion.config import get_preset

    cfg = get_preset("tiny", n_layers=1, dim=64, n_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    if family == "transfusion":
        from transfusion.transfusion_model import Transfusion

        model = Transfusion(cfg).eval()
    else:
        from transfusion.baseline import DiscreteLM

        model = DiscreteLM(cfg.replace(codebook_size=16)).eval()
    tok = ByteTokenizer()
    texts = ["a red circle", "there is a small blue cross at the bottom left"]
    fn = model_logits_fn(model)
    together = bits_per_byte_of_texts(fn, tok, texts, batch_size=2)
    apart = [bits_per_byte_of_texts(fn, tok, [t]) for t in texts]
    assert together.nll_nats == pytest.approx(sum(a.nll_nats for a in apart), rel=1e-4)
    # an untrained model is close to uniform over its vocabulary
    V = model.lm_head.out_features
    assert together.nats_per_token == pytest.approx(math.log(V), rel=0.1)
