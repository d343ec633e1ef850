"""Launch order of the interval kernel's programs: heaviest first.

Under the Transfusion mask the programs of one launch do very different amounts of work. In a causal
document of 2048 tokens the last query block visits 16 times as many key blocks as the first, and for the
dK/dV kernel it is the other way round. A GPU starts programs in launch order as its SMs free up, so when
heavy programs come last the launch ends with a tail of a few SMs busy and the rest idle. Starting the
heaviest programs first (the *longest processing time first* rule of list scheduling) leaves only light
programs for the end. The outputs do not change: every program computes the same tiles, only when
it starts differs, and there are no atomics.

:func:`work_order` builds, once per layout, one table for every power-of-two block size the kernels may
be tuned to (``ORDER_SIZES``), because the block size is chosen by the autotuner after the table is made::

    order[0, r]  query blocks of BLOCK_M = 16 << r, heaviest first (forward and dQ kernels)
    order[1, r]  key blocks of BLOCK_N = 16 << r, heaviest first (dK/dV kernel)

Each entry is ``b * n_blocks + block`` for batch row ``b``; a row of the table is padded past its
``B * n_blocks`` entries. The kernels run every head of the heaviest block first: program ``p`` takes
entry ``p // H`` and head ``p % H``.

The work of a query block is the span of keys its rows may see (``max hi - min lo + 1``), which the
forward and dQ kernels walk in key blocks; that of a key block is the number of query chunks in the range
the dK/dV kernel visits for it (read from the key-major table, exactly as the kernel reads it). Ties keep
the natural order. :func:`list_schedule_makespan` is the textbook model of how long a launch takes for a
given order (each program's time its work plus a constant, greedy assignment to the first free SM).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch

CHUNK = 16  # granularity of the key-major table (interval_attention uses this one): 16 keys per row
ORDER_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def order_shape(batch: int, q_len: int, kv_len: int) -> tuple[int, int, int]:
    """Shape of :func:`work_order`'s table for this batch size and these lengths."""
    return (2, len(ORDER_SIZES), batch * _cdiv(max(q_len, kv_len), CHUNK))


def blocked_intervals(
    lo: torch.Tensor, hi: torch.Tensor, kv_len: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' intervals clipped to [0, kv_len), grouped into query blocks: (lo, hi, non-empty), each
    (B, ceil(Lq / block), block); rows past Lq get the empty interval [1, 0]."""
    bsz, q_len = lo.shape
    n_blocks = _cdiv(q_len, block)
    pad = n_blocks * block - q_len
    lo_c = lo.clamp(min=0)
    hi_c = hi.clamp(max=kv_len - 1)
    if pad:
        lo_c = torch.nn.functional.pad(lo_c, (0, pad), value=1)
        hi_c = torch.nn.functional.pad(hi_c, (0, pad), value=0)
    lo_c, hi_c = lo_c.view(bsz, n_blocks, block), hi_c.view(bsz, n_blocks, block)
    return lo_c, hi_c, lo_c <= hi_c


def query_block_work(lo: torch.Tensor, hi: torch.Tensor, kv_len: int, block: int) -> torch.Tensor:
    """(B, ceil(Lq / block)) int64: keys spanned by each query block's non-empty rows (0 if none)."""
    lo_c, hi_c, valid = blocked_intervals(lo.long(), hi.long(), kv_len, block)
    kmin = torch.where(valid, lo_c, torch.full_like(lo_c, 1 << 40)).amin(-1)
    kmax = torch.where(valid, hi_c, torch.full_like(hi_c, -1)).amax(-1)
    return (kmax - kmin + 1).clamp(min=0)


def key_block_work(kv_table: torch.Tensor, q_len: int, kv_len: int, block: int) -> torch.Tensor:
    """(B, ceil(Lk / block)) int64: query chunks in the range the dK/dV kernel visits for each key block
    (``[c_first(t0), c_end(t1))`` of the key-major table, as the kernel reads it)."""
    n_blocks = _cdiv(kv_len, block)
    step = block // CHUNK
    t0 = torch.arange(n_blocks, device=kv_table.device) * step
    first = kv_table[:, t0, 0].long()
    end = kv_table[:, t0 + step, 1].long()
    first = torch.where(first < _cdiv(q_len, CHUNK), first, end)  # no query chunk sees it: no work
    return (end - first).clamp(min=0)


def heaviest_first(work: torch.Tensor) -> torch.Tensor:
    """Flat indices ``b * n_blocks + block`` of a (B, n_blocks) work tensor, heaviest first; ties keep
    the natural order."""
    return torch.sort(work.flatten(), descending=True, stable=True).indices.to(torch.int32)


def work_order(lo: torch.Tensor, hi: torch.Tensor, kv_len: int, kv_table: torch.Tensor) -> torch.Tensor:
    """The launch-order table of a layout (see the module doc): (2, len(ORDER_SIZES), B * n16) int32.

    ``kv_table`` is ``key_major_table(lo, hi, kv_len)`` of the same layout.
    """
    bsz, q_len = lo.shape
    order = torch.zeros(order_shape(bsz, q_len, kv_len), dtype=torch.int32, device=lo.device)
    if bsz == 0 or q_len == 0 or kv_len == 0:
        return order
    for r, block in enumerate(ORDER_SIZES):
        rows = heaviest_first(query_block_work(lo, hi, kv_len, block))
        order[0, r, : rows.numel()] = rows
        keys = heaviest_first(key_block_work(kv_table, q_len, kv_len, block))
        order[1, r, : keys.numel()] = keys
    return order


def list_schedule_makespan(work: Iterable[float], slots: int, overhead: float = 1.0) -> float:
    """Finish time of programs started in the given order on ``slots`` identical workers (SMs times
    resident programs per SM), each taking its work plus ``overhead``, each started on the first free
    worker. A model of a launch's duration in units of one tile, not a measurement."""
    if slots < 1:
        raise ValueError(f"slots = {slots} must be >= 1")
    free = [0.0] * slots
    for w in work:
        heapq.heappush(free, heapq.heappop(free) + float(w) + overhead)
    return max(free)


__all__ = [
    "ORDER_SIZES",
    "blocked_intervals",
    "heaviest_first",
    "key_block_work",
    "list_schedule_makespan",
    "order_shape",
    "query_block_work",
    "work_order",
]
