"""The launch-order table (kernels/work_order.py) against definitions computed here from the mask.

Work of a query block: the span from the smallest to the largest key any of its rows may see. Work of a
key block: the query chunks (16 rows) from the first to the last one holding a row that sees the block.
Both are recomputed from the dense definition mask of random layouts (tests.test_triton_kernel's own
generator), and every row of the table must be a permutation of the blocks sorted by that work.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels.work_order import (
    CHUNK,
    ORDER_SIZES,
    key_block_work,
    list_schedule_makespan,
    order_shape,
    query_block_work,
    work_order,
)
from tests.test_triton_kernel import DEVICES, random_case

ia = importlib.import_module("kernels.interval_attention")
_program_block = ia._program_block  # a global of this module, so the probe kernel below can call it


def _span_by_definition(mask: torch.Tensor, block: int, unit: int) -> torch.Tensor:
    """(B, blocks) over blocks of ``block`` rows of ``mask``: from the first to the last column any row of
    the block may attend, counted in groups of ``unit`` columns (0 for a block that attends nothing).
    Query work is this on the mask in keys (unit 1), key work on its transpose in query chunks."""
    bsz, rows, _ = mask.shape
    n_blocks = -(-rows // block)
    work = torch.zeros(bsz, n_blocks, dtype=torch.long)
    for b in range(bsz):
        for m in range(n_blocks):
            cols = mask[b, m * block : (m + 1) * block].any(0).nonzero().flatten()
            if cols.numel():
                work[b, m] = cols.max() // unit - cols.min() // unit + 1
    return work


@pytest.mark.parametrize("trial", range(12))
def test_work_and_order_match_the_definition(trial):
    bsz = 1 + trial % 3
    kv_len = int(torch.randint(1, 200, ()).item())
    q_len = kv_len if trial % 2 else int(torch.randint(1, kv_len + 1, ()).item())
    case = random_case(bsz, kv_len, q_len)
    table = ia.key_major_table(case.lo, case.hi, kv_len)
    order = work_order(case.lo, case.hi, kv_len, table)
    assert order.shape == order_shape(bsz, q_len, kv_len) and order.dtype == torch.int32
    for r, block in enumerate(ORDER_SIZES):
        q_work = query_block_work(case.lo, case.hi, kv_len, block)
        k_work = key_block_work(table, q_len, kv_len, block)
        assert torch.equal(q_work, _span_by_definition(case.mask, block, 1)), (case.text, block)
        by_keys = _span_by_definition(case.mask.transpose(1, 2), block, CHUNK)
        assert torch.equal(k_work, by_keys), (case.text, block)
        for side, work in ((0, q_work), (1, k_work)):
            flat = work.flatten()
            got = order[side, r, : flat.numel()].long()
            assert torch.equal(got.sort().values, torch.arange(flat.numel())), "not a permutation"
            w = flat[got]
            assert (w[1:] <= w[:-1]).all(), "not heaviest first"
            ties = w[1:] == w[:-1]
            assert (got[1:][ties] > got[:-1][ties]).all(), "ties must keep the natural order"


def test_makespan_model():
    # Two workers: the natural order leaves the long program for last, heaviest first does not.
    assert list_schedule_makespan([1, 1, 1, 1, 4], slots=2, overhead=0) == 6
    assert list_schedule_makespan([4, 1, 1, 1, 1], slots=2, overhead=0) == 4
    assert list_schedule_makespan([2, 2], slots=4, overhead=0.5) == 2.5
    with pytest.raises(ValueError, match="slots = 0"):
        list_schedule_makespan([1], slots=0)


def test_empty_layouts():
    lo = torch.zeros(2, 0, dtype=torch.int32)
    order = work_order(lo, lo, 0, torch.zeros(2, 17, 4, dtype=torch.int32))
    assert order.shape == (2, len(ORDER_SIZES), 0)


def test_launch_order_model_command(tmp_path):
    """`python -m bench launch-order`: the makespans are bounded below by the ideal (total work over the
    slots), a launch with fewer programs than slots gains nothing, and the program counts are the grid's."""
    import pandas as pd

    from bench.__main__ import main
    from bench.report import build_report

    out = tmp_path / "kernels"
    assert main(["launch-order", "--out", str(out)]) == 0
    df = pd.read_csv(out / "launch_order_model.csv")
    assert (df.natural_over_ideal >= 1 - 1e-12).all() and (df.heaviest_first_over_ideal >= 1 - 1e-12).all()
    few = df[df.programs <= df.slots]
    assert not few.empty and (few.modelled_speedup == 1.0).all()
    rows = df[df.kernel != "dkdv"]
    assert (rows.programs == rows.batch * rows.heads * -(-rows.seq_len // rows.block_m)).all()
    assert (out / "launch_order_model.md").read_text().count("| sweep |") == 3
    assert "## Triton kernel (kernels): launch order" in build_report(tmp_path).read_text()
    with pytest.raises(SystemExit):
        main(["launch-order", "--sms", "0", "--out", str(out)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ordered", [1, 0])
def test_program_block_mapping_for_every_block_size(device, ordered):
    """The kernels' program -> (b, b * H + h, block) mapping, run as a Triton kernel (interpreted on CPU)
    for every block size the table has a row for: heaviest first it follows that row, head fastest;
    natural order is blocks fastest, then heads. Either way every (b, h, block) is visited once."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(ORDER, ORDER_STRIDE, ORDERED, OUT, n_blocks, H, BLOCK: tl.constexpr):
        b, bh, blk = _program_block(ORDER, ORDER_STRIDE, ORDERED, n_blocks, H, BLOCK)
        p = tl.program_id(0)
        tl.store(OUT + p * 3, b.to(tl.int32))
        tl.store(OUT + p * 3 + 1, bh.to(tl.int32))
        tl.store(OUT + p * 3 + 2, blk.to(tl.int32))

    bsz, heads, length = 2, 3, 300
    case = random_case(bsz, length, length)
    lo, hi = case.lo.to(device), case.hi.to(device)
    order = work_order(lo, hi, length, ia.key_major_table(lo, hi, length))
    for side, r, block in ((s, r, b) for s in (0, 1) for r, b in enumerate(ORDER_SIZES)):
        n_blocks = -(-length // block)
        programs = bsz * heads * n_blocks
        out = torch.full((programs, 3), -1, dtype=torch.int32, device=device)
        probe[(programs,)](order[side], order.shape[2], ordered, out, n_blocks, heads, BLOCK=block)
        b, bh, blk = out.cpu().long().unbind(1)
        p = torch.arange(programs)
        if ordered:
            entry = order[side, r, p // heads].cpu().long()
            want = (entry // n_blocks, (entry // n_blocks) * heads + p % heads, entry % n_blocks)
        else:
            want = ((p // n_blocks) // heads, p // n_blocks, p % n_blocks)
        for got, exp in zip((b, bh, blk), want):
            assert torch.equal(got, exp), (side, block, ordered)
        assert torch.equal(bh // heads, b)
        assert torch.unique(bh * n_blocks + blk).numel() == programs  # each (b, h, block) exactly once
