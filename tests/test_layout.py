import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.random_layouts import definition_mask, random_row_spans
from transfusion.layout import IMAGE, PAD, TEXT, AttentionLayout


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), seq_len=st.integers(1, 80))
def test_dense_mask_equals_definition(seed, seq_len):
    docs, images = random_row_spans(random.Random(seed), seq_len)
    layout = AttentionLayout.from_spans(seq_len, docs, images)
    assert torch.equal(layout.dense_mask()[0], definition_mask(seq_len, docs, images))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), seq_len=st.integers(1, 80))
def test_queries_seeing_each_key_are_contiguous(seed, seq_len):
    docs, images = random_row_spans(random.Random(seed), seq_len)
    mask = AttentionLayout.from_spans(seq_len, docs, images).dense_mask()[0]
    for key in range(seq_len):
        rows = mask[:, key].nonzero().flatten()
        if len(rows):
            assert rows[-1] - rows[0] + 1 == len(rows), f"key {key} seen by non-contiguous queries {rows}"


def test_stack_and_modality():
    a = AttentionLayout.from_spans(10, [(0, 6), (7, 10)], [(2, 4)])
    b = AttentionLayout.from_spans(10, [(0, 10)], [(0, 3), (5, 10)])
    batch = AttentionLayout.stack([a, b])
    assert batch.lo.shape == (2, 10)
    assert batch.modality[0].tolist() == [TEXT, TEXT, IMAGE, IMAGE, TEXT, TEXT, PAD, TEXT, TEXT, TEXT]
    assert batch.image_spans == (((2, 4),), ((0, 3), (5, 10)))
    assert torch.equal(batch.dense_mask()[1], b.dense_mask()[0])
    assert batch.allowed_pairs().tolist() == [int(a.dense_mask().sum()), int(b.dense_mask().sum())]


def test_padding_has_empty_interval():
    layout = AttentionLayout.from_spans(8, [(2, 5)])
    mask = layout.dense_mask()[0]
    assert not mask[[0, 1, 5, 6, 7]].any()
    assert layout.valid[0].tolist() == [False, False, True, True, True, False, False, False]


def test_causal_only_variant():
    layout = AttentionLayout.from_spans(12, [(0, 12)], [(3, 8)])
    causal = layout.causal_only().dense_mask()[0]
    assert torch.equal(causal, torch.ones(12, 12).tril().bool())
    full = layout.dense_mask()[0]
    assert full[3, 7] and not causal[3, 7]


def test_query_offset_for_decoding():
    layout = AttentionLayout.from_spans(20, [(0, 20)], [(10, 16)])
    suffix = layout.queries(10)
    assert (suffix.q_len, suffix.kv_len, suffix.q_offset) == (10, 20, 10)
    assert torch.equal(suffix.dense_mask()[0], layout.dense_mask()[0, 10:])
    with pytest.raises(ValueError, match="start = 25"):
        layout.queries(25)


@pytest.mark.parametrize(
    "docs, images, match",
    [
        ([(0, 5), (3, 8)], [], r"docs\[1\] = \(3, 8\) overlaps"),
        ([(5, 8), (0, 3)], [], r"docs\[1\] = \(0, 3\) is not sorted"),
        ([(0, 12)], [], r"runs past seq_len = 10"),
        ([(0, 4), (5, 10)], [(3, 6)], r"images\[0\] = \(3, 6\) does not lie inside one document"),
        ([(0, 4)], [(6, 8)], r"images\[0\] = \(6, 8\) does not lie inside"),
        ([(3, 3)], [], r"empty or negative"),
        ([(0, 10)], [(2, 5), (4, 7)], r"images\[1\] = \(4, 7\) overlaps"),
    ],
)
def test_bad_spans_raise_clear_errors(docs, images, match):
    with pytest.raises(ValueError, match=match):
        AttentionLayout.from_spans(10, docs, images)


def test_non_monotone_lo_hi_rejected():
    good = AttentionLayout.from_spans(6, [(0, 6)])
    lo = good.lo.clone()
    lo[0, 4] = 5
    lo[0, 5] = 0
    with pytest.raises(ValueError, match="lo is not non-decreasing: row 0, query 5"):
        AttentionLayout(lo, good.hi, good.doc_id, good.image_id, good.modality, good.image_spans, 6)
    hi = good.hi.clone()
    hi[0, 5] = 9
    with pytest.raises(ValueError, match="kv_len = 6"):
        AttentionLayout(good.lo, hi, good.doc_id, good.image_id, good.modality, good.image_spans, 6)
    with pytest.raises(ValueError, match="lo must be int32"):
        AttentionLayout(
            good.lo.long(), good.hi, good.doc_id, good.image_id, good.modality, good.image_spans, 6
        )


def test_stack_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"rows\[1\] has \(kv_len, q_len\) = \(9, 9\)"):
        AttentionLayout.stack(
            [AttentionLayout.from_spans(8, [(0, 8)]), AttentionLayout.from_spans(9, [(0, 9)])]
        )
