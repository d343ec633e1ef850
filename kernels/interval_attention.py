"""Interval attention: a flash-attention kernel for the Transfusion mask, driven by per-query key intervals.

The mask
========
Transfusion packs several mixed-modal documents into one row. A query may attend a key when both lie in
the same document and the key is not in the future, except that the patches of one image see each other
in both directions. Documents and images are contiguous spans, so the keys a query ``i`` may attend form a
single interval::

    allowed(i, j)  <=>  lo[i] <= j <= hi[i]          (absolute key indices, 0 <= j < Lk)

``hi[i] < lo[i]`` is the empty interval (a padding token): its output row is exactly zero, and so are its
gradients. When decoding, the queries are the last ``Lq`` of ``Lk`` positions; ``lo``/``hi`` keep absolute
key indices, so nothing changes but ``Lq != Lk``.

The algorithm
=============
The kernel is the usual flash attention (tiles of ``BLOCK_M`` queries by ``BLOCK_N`` keys, an online
softmax in fp32, the log-sum-exp saved for the backward pass), plus a *tile plan* that decides which tiles
to visit and which of them need the mask at all. For one query block, with its rows' intervals clipped to
``[0, Lk)`` and the empty rows ignored::

    kmin  = min lo     kmax  = max hi       every key any row may see lies in [kmin, kmax]
    maxlo = max lo     minhi = min hi       every row sees all of [maxlo, minhi]

    key blocks   [kmin // BN, kmax // BN]                   the only ones that can hold an allowed pair
    full blocks  [ceil(maxlo / BN), floor((minhi + 1) / BN))  inside every row's interval (and inside Lk)

so the key loop is three loops: masked tiles on the left edge, *full* tiles in the middle, masked tiles
on the right edge. What is skipped, and why it is safe:

* Key blocks outside ``[kmin, kmax]``: no row of the block may see them, so they would only add
  ``exp(-inf) = 0``. For documents of length ``S`` this turns the ``O(L^2)`` dense cost into ``O(L * S)``.
* Mask arithmetic in full tiles: every (row, key) pair there is allowed, so the tile runs the plain,
  pipelined flash-attention step with no compares, no ``where`` and no bounds checks on the keys.
* Masked tiles with no allowed pair: a block that straddles a document boundary can have a gap between
  its rows' intervals (``[0, 5]`` and ``[40, 40]``, say). Each edge tile first checks whether any row's
  interval meets it (a reduction over ``BLOCK_M`` integers) and skips it otherwise.

Empty rows and rows past ``Lq`` still ride along in full tiles (their values are never stored): the
forward writes zeros and a log-sum-exp of ``+inf`` for them, so in the backward their probabilities
``exp2(s - lse)`` are exactly zero without any mask.

The backward pass is the standard one: ``delta = rowsum(dO * O)``, then one kernel per key block that
loops over query blocks and accumulates dK and dV, and one kernel per query block that loops over key
blocks and accumulates dQ (no atomics, so the gradients are deterministic). The dQ kernel uses the same
tile plan as the forward. The dK/dV kernel needs the transpose, the query blocks that see a key block.
Because ``lo`` and ``hi`` are non-decreasing along the queries, those form one contiguous range, and so
do the query blocks for which the key block is full. We find them with monotone *envelopes* of the
per-query-block statistics (a running max of ``kmax`` and ``maxlo`` from the left, a running min of
``kmin`` and ``minhi`` from the right) and binary searches over them. The envelopes only widen the
visited range and only shrink the full range, so even intervals that are not monotone stay correct (the
edge tiles' liveness check then skips what the envelope over-covers). The searches are done once on the
host for every 16-key boundary, over 16-query chunks, so any block size that is a multiple of 16 can read
its ranges from the same small table and the block sizes can be autotuned freely.

That *split* scheme recomputes every tile's probabilities and dP in the dQ kernel: seven tile matmuls
where five would do. The *atomic* scheme (FlashAttention-2's) skips the dQ kernel: the dK/dV kernel,
which already holds dS for the tile, also forms dS @ K and adds it to an fp32 dQ buffer with atomics (the
order of those sums varies, so dQ is not bitwise reproducible). Which is faster depends on the GPU, the
shape and the atomics' cost, so by default (``backward_mode("auto")``) the backward pass times both once
per shape on CUDA and keeps the faster, as the autotuner does for block sizes; fp32, the interpreter and
``torch.use_deterministic_algorithms`` keep the split scheme.

On Hopper GPUs (CUDA capability 9+, fp16/bf16) every kernel also has *TMA* candidate configs: the
operands of full tiles (K and V in the forward and dQ kernels, Q and dO in the dK/dV kernel) are loaded
through host-side tensor descriptors, i.e. by the tensor-memory accelerator, instead of per-thread pointer
loads. Full tiles never cross a head's rows (key blocks of full tiles lie inside [0, Lk), and the dK/dV
kernel sends a query block that ends past Lq down the pointer path), so the descriptors span all heads'
rows as one (B*H*L, D) matrix. Edge tiles always use masked pointer loads. The autotuner picks between
pointer and TMA configs per shape and logs every timing (:func:`tuning_log`).

Every kernel starts its programs heaviest first: program ``p`` reads which (batch row, block) to compute
from a launch-order table (:mod:`kernels.work_order`, one row per possible block size since the
autotuner picks the size after the table is built), every head of the heaviest block first. Without a
table (short query runs, or ``program_order("natural")``) the order is the grid's: blocks, then heads.

The kernel, the dQ kernel and :func:`plan_tiles` all call the same ``_query_block_plan`` and
``_tile_live`` Triton functions, so the tile counts that the planner reports are the tiles that the
kernel computes (the tests check this with an in-kernel counter).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import triton
import triton.language as tl

from .config_names import config_name
from .config_names import length_bucket as _bucket
from .work_order import CHUNK, ORDER_SIZES, blocked_intervals, order_shape, work_order

try:  # host-side TMA descriptors (Triton >= 3.3); without them only the pointer configs exist
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton version
    _TensorDescriptor = None

__all__ = [
    "CHUNK",
    "INTERPRET",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "BACKWARD_MODES",
    "backward_choices",
    "backward_mode",
    "candidate_count",
    "config_name",
    "planned_configs",
    "count_tiles",
    "interpreter_problem",
    "interval_attention",
    "kernel_block_sizes",
    "kernel_configs",
    "key_major_table",
    "launched_configs",
    "plan_tiles",
    "poison_outputs",
    "program_order",
    "tuning_log",
]

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (32, 64, 128)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# CHUNK (from work_order): granularity of the host-side key-major table; every block size is a multiple
# of it. Every block size is one of ORDER_SIZES (the launch-order table has a row for each).
_MAX_BLOCK = ORDER_SIZES[-1]
_BIG = 1 << 30
_LOG2E = 1.4426950408889634  # log2(e)
# fp32 inputs: "ieee" keeps fp32 accuracy; "tf32" is faster on tensor cores but only ~1e-3 accurate.
FP32_DOT_PRECISION = "ieee"
# True when Triton runs its CPU interpreter (set by kernels/__init__.py when there is no CUDA).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# INTERVAL_ATTENTION_AUTOTUNE=0 pins the first (default) config of each kernel: no tuning, fixed blocks.
_AUTOTUNE: bool = os.environ.get("INTERVAL_ATTENTION_AUTOTUNE", "1") != "0"
# Launch order of the programs (kernels/work_order.py): heaviest first, or "natural" (blocks, then heads).
ORDERS: tuple[str, ...] = ("heaviest-first", "natural")
_ORDER: str = os.environ.get("INTERVAL_ATTENTION_ORDER", "heaviest-first")
# The backward scheme: "split" (a dQ kernel beside the dK/dV kernel: deterministic), "atomic" (the dK/dV
# kernel also adds dQ with fp32 atomics, as FlashAttention-2 does: two fewer matmuls per tile), or "auto"
# (on CUDA in half precision, time both once per shape and keep the faster; "split" elsewhere and under
# torch.use_deterministic_algorithms).
BACKWARD_MODES: tuple[str, ...] = ("auto", "split", "atomic")
_BACKWARD: str = os.environ.get("INTERVAL_ATTENTION_BACKWARD", "auto")
# Below this many queries (decoding steps) interval_attention keeps the natural order instead of building
# the launch-order table: a launch that small has few programs to order.
ORDER_MIN_QUERIES = 256


# ----------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages, tma). BLOCK_M always counts queries and BLOCK_N keys; the
# forward and dQ kernels loop over key blocks, the dK/dV kernel over query blocks. ``tma`` loads the full
# tiles' operands through Hopper's tensor-memory accelerator (host-side TensorDescriptors); those
# candidates run only where TMA exists (CUDA capability >= 9, half precision). The first entry is the
# default (the only one when autotuning is off). 128x128 tiles at D = 128 keep 2 stages: with 3, K and V
# buffers plus Q would need about 224 KB of shared memory, the whole of an H100's. The backward lists
# include the blocks FlexAttention's own heuristics use on sm90 at D <= 128 (dK/dV 64 queries x 128 keys,
# dQ 128 x 64, 8 warps, 3 stages, in torch/_inductor/heuristics/template/triton.py), the backend we race.
# ``dkdv-atomic`` is the dK/dV kernel of the atomic backward scheme, with a sixth field: compute dQ
# transposed (dQ^T = K^T dS^T, HEAD_DIM rows: Hopper's wgmma wants M >= 64, so this is how a 32-query block
# keeps its dQ product on wgmma). Its half-precision lists hold the configs that compile for sm90 with
# little or no spill (results/kernels/kernel_resources.md): dK, dV and the dQ product all live in
# registers at once. (In fp32 every dK/dV config spills, split or atomic; fp32 is for accuracy.)
# No GPU list holds a transposed-dQ config: on the H200 under Triton 3.6 both that were listed (16x128 and
# 32x128, 8 warps, 3 stages, at D = 128) gave wrong dQ (NaN/inf, or 11x the reference's norm in error)
# and 32x128 an illegal memory access at L = 8192, while the same configs are right in the interpreter
# and every other config passed (results/gpu/kernel_check_*.csv and NOTES.md). The code path stays,
# checked in the interpreter, for a Triton that compiles it right; bench kernel-check tells.
_F, _T = False, True
# fmt: off
_GPU_CANDIDATES: dict[str, dict[tuple[str, int], list[tuple]]] = {
    "fwd": {
        ("half", 32): [(128, 64, 4, 3, _F), (128, 128, 8, 3, _F), (64, 64, 4, 3, _F), (128, 64, 4, 3, _T)],
        ("half", 64): [(128, 64, 4, 3, _F), (128, 128, 8, 3, _F), (64, 64, 4, 3, _F),
                       (128, 64, 4, 3, _T), (128, 128, 8, 3, _T), (64, 64, 4, 3, _T)],
        ("half", 128): [(128, 64, 8, 3, _F), (128, 128, 8, 2, _F), (64, 64, 4, 3, _F),
                        (128, 64, 8, 3, _T), (128, 128, 8, 2, _T), (64, 64, 4, 3, _T)],
        ("fp32", 32): [(64, 64, 4, 2, _F), (64, 32, 4, 2, _F), (32, 32, 4, 2, _F)],
        ("fp32", 64): [(64, 64, 4, 2, _F), (64, 32, 4, 2, _F), (32, 32, 4, 2, _F)],
        ("fp32", 128): [(64, 32, 4, 2, _F), (32, 32, 4, 2, _F), (64, 64, 8, 2, _F)],
    },
    "dkdv": {
        ("half", 32): [(32, 128, 4, 3, _F), (64, 128, 8, 3, _F), (64, 64, 4, 3, _F), (32, 128, 4, 3, _T)],
        ("half", 64): [(32, 128, 4, 3, _F), (64, 128, 8, 3, _F), (64, 64, 4, 3, _F),
                       (32, 128, 4, 3, _T), (64, 128, 8, 3, _T), (64, 64, 4, 3, _T)],
        ("half", 128): [(32, 128, 8, 3, _F), (64, 128, 8, 2, _F), (64, 64, 4, 3, _F), (64, 128, 8, 3, _F),
                        (32, 128, 8, 3, _T), (64, 128, 8, 3, _T), (64, 64, 4, 3, _T)],
        ("fp32", 32): [(32, 64, 4, 2, _F), (32, 32, 4, 2, _F), (64, 64, 4, 2, _F)],
        ("fp32", 64): [(32, 64, 4, 2, _F), (32, 32, 4, 2, _F), (64, 64, 4, 2, _F)],
        ("fp32", 128): [(32, 64, 4, 2, _F), (32, 32, 4, 2, _F), (16, 64, 4, 2, _F)],
    },
    "dkdv-atomic": {
        ("half", 32): [(32, 128, 4, 3, _F, _F), (64, 128, 8, 3, _F, _F), (32, 128, 4, 3, _T, _F)],
        ("half", 64): [(64, 128, 8, 3, _F, _F), (32, 128, 4, 3, _F, _F)],
        ("half", 128): [(32, 128, 8, 3, _F, _F), (32, 128, 8, 3, _T, _F)],
        ("fp32", 32): [(32, 64, 4, 2, _F, _F)],
        ("fp32", 64): [(32, 64, 4, 2, _F, _F)],
        ("fp32", 128): [(32, 64, 4, 2, _F, _F), (16, 64, 4, 2, _F, _F)],
    },
    "dq": {
        ("half", 32): [(128, 32, 4, 3, _F), (128, 64, 8, 3, _F), (64, 64, 4, 3, _F), (128, 32, 4, 3, _T)],
        ("half", 64): [(128, 32, 4, 3, _F), (128, 64, 8, 3, _F), (64, 64, 4, 3, _F),
                       (128, 32, 4, 3, _T), (128, 64, 8, 3, _T), (64, 64, 4, 3, _T)],
        ("half", 128): [(128, 32, 8, 3, _F), (128, 64, 8, 2, _F), (64, 64, 4, 3, _F), (128, 64, 8, 3, _F),
                        (128, 32, 8, 3, _T), (128, 64, 8, 3, _T), (64, 64, 4, 3, _T)],
        ("fp32", 32): [(64, 32, 4, 2, _F), (32, 32, 4, 2, _F), (64, 64, 4, 2, _F)],
        ("fp32", 64): [(64, 32, 4, 2, _F), (32, 32, 4, 2, _F), (64, 64, 4, 2, _F)],
        ("fp32", 128): [(64, 32, 4, 2, _F), (32, 32, 4, 2, _F), (64, 16, 4, 2, _F)],
    },
}
# fmt: on
# Which descriptor arguments each kernel loads through TMA, and which block size is their row count.
_DESCRIPTOR_ARGS: dict[str, tuple[tuple[str, str], str]] = {
    "fwd": (("DESC_K", "DESC_V"), "BLOCK_N"),
    "dq": (("DESC_K", "DESC_V"), "BLOCK_N"),
    "dkdv": (("DESC_Q", "DESC_DO"), "BLOCK_M"),
    "dkdv-atomic": (("DESC_Q", "DESC_DO"), "BLOCK_M"),
}
# The interpreter runs every tile in numpy: small tiles keep it quick and exercise the edge cases. It has
# a pointer config and a TMA config (the second runs only under ``kernel_configs(tma=True)``).
_INTERPRETER_BLOCKS = (16, 16)

# Testing / benchmarking restriction of the candidates (see kernel_configs): None or a bool, None or an int.
# INTERVAL_ATTENTION_TMA=0 starts with the TMA candidates switched off (a fallback should they fail).
_TMA_MODE: bool | None = False if os.environ.get("INTERVAL_ATTENTION_TMA", "1") == "0" else None
_PIN_INDEX: int | None = None


def _parse_exclusions(text: str) -> frozenset[tuple[str, str, int, str]]:
    """INTERVAL_ATTENTION_EXCLUDE: candidates to leave out, ``kernel,dtype,head_dim,config`` entries
    separated by ``;`` (e.g. ``dkdv-atomic,bfloat16,128,32x128 w8 s3 dqT``): how a GPU run drops the
    configs that ``bench kernel-check`` found wrong before it sweeps."""
    out = set()
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        parts = [p.strip() for p in entry.split(",")]
        if len(parts) != 4 or parts[0] not in _GPU_CANDIDATES or not parts[2].isdigit():
            raise ValueError(
                f"INTERVAL_ATTENTION_EXCLUDE entry {entry!r}: want 'kernel,dtype,head_dim,config' with "
                f"kernel one of {sorted(_GPU_CANDIDATES)}"
            )
        out.add((parts[0], parts[1], int(parts[2]), parts[3]))
    return frozenset(out)


_EXCLUDED = _parse_exclusions(os.environ.get("INTERVAL_ATTENTION_EXCLUDE", ""))


def _excluded(kernel: str, dtype: torch.dtype, head_dim: int, cfg: tuple) -> bool:
    """Is this candidate named in INTERVAL_ATTENTION_EXCLUDE?"""
    return (kernel, str(dtype).removeprefix("torch."), head_dim, config_name(cfg)) in _EXCLUDED


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _config_key(cfg: triton.Config) -> tuple:
    """The candidate tuple of a config: (BLOCK_M, BLOCK_N, warps, stages, tma[, dQ transposed])."""
    kw = cfg.kwargs
    key = (kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_warps, cfg.num_stages, bool(kw["USE_TMA"]))
    return key + ((bool(kw["DQ_T"]),) if "DQ_T" in kw else ())


def _descriptor_hook(kernel: str):
    """Config pre-hook: a TMA descriptor's block is the tile the config loads ([rows, HEAD_DIM])."""
    names, rows = _DESCRIPTOR_ARGS[kernel]

    def hook(nargs: dict) -> None:
        for name in names:
            desc = nargs[name]
            if _TensorDescriptor is not None and isinstance(desc, _TensorDescriptor):
                desc.block_shape = [nargs[rows], nargs["HEAD_DIM"]]

    return hook


def _make_configs(kernel: str) -> list[triton.Config]:
    hook = _descriptor_hook(kernel)
    if INTERPRET:
        bm, bn = _INTERPRETER_BLOCKS
        keys = [(bm, bn, 4, 1, tma) for tma in (False, True)]
        if kernel == "dkdv-atomic":
            keys = [key + (dq_t,) for key in keys for dq_t in (False, True)]
    else:
        keys = list(dict.fromkeys(c for cands in _GPU_CANDIDATES[kernel].values() for c in cands))
    configs = []
    for bm, bn, warps, stages, tma, *dq_t in keys:
        kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma} | ({"DQ_T": dq_t[0]} if dq_t else {})
        configs.append(triton.Config(kwargs, num_warps=warps, num_stages=stages, pre_hook=hook))
    return configs


def _candidates(kernel: str, dtype: torch.dtype, head_dim: int, descriptors: bool) -> list[tuple]:
    """The candidate configs of one launch, after the TMA and pinning restrictions."""
    if INTERPRET:
        bm, bn = _INTERPRETER_BLOCKS
        if kernel == "dkdv-atomic":  # both dQ orientations: kernel_configs(index=1) pins the transposed one
            return [(bm, bn, 4, 1, descriptors, bool(_PIN_INDEX))]
        return [(bm, bn, 4, 1, descriptors)]  # descriptors are only built when tma=True is asked for
    cands = _GPU_CANDIDATES[kernel][(_dtype_class(dtype), head_dim)]
    if not descriptors:
        cands = [c for c in cands if not c[4]]
    elif _TMA_MODE:
        cands = [c for c in cands if c[4]]
    if _EXCLUDED:
        kept = [c for c in cands if not _excluded(kernel, dtype, head_dim, c)]
        if not kept:
            raise ValueError(
                f"INTERVAL_ATTENTION_EXCLUDE leaves kernel {kernel!r} no candidate at "
                f"{str(dtype).removeprefix('torch.')}, head dim {head_dim}"
            )
        cands = kept
    if _PIN_INDEX is not None:
        return [cands[min(_PIN_INDEX, len(cands) - 1)]]
    return cands if _AUTOTUNE else cands[:1]


def _make_pruner(kernel: str):
    """Keep the candidates for this head dim, dtype class and descriptor kind (see _candidates)."""
    desc_name = _DESCRIPTOR_ARGS[kernel][0][0]

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        has_desc = _TensorDescriptor is not None and isinstance(args[desc_name], _TensorDescriptor)
        wanted = _candidates(kernel, args["Q"].dtype, args["HEAD_DIM"], has_desc)
        by_key = {_config_key(c): c for c in configs}
        global _LONE_CANDIDATE
        _LONE_CANDIDATE = len(wanted) == 1  # read by _time_candidates, which Triton calls next
        return [by_key[w] for w in wanted]

    return prune


def _autotune(kernel: str):
    """`triton.autotune` keyed on the head dim, the (power-of-two bucketed) lengths and the candidate
    restriction; dtype is added by Triton itself. Benchmarks are kept short: the GPU sessions that run
    this are minutes long. Every tuning's timings go to the tuning log (see tuning_log)."""
    kwargs = {
        "configs": _make_configs(kernel),
        "key": ["HEAD_DIM", "LQ_KEY", "LK_KEY", "TUNE_TAG"],
        # Benchmark runs must not add up in the tile counter (testing hook) nor in the atomic dQ buffer;
        # Triton zeroes these before each timed run and once more before the real launch.
        "reset_to_zero": ["COUNTER"] + (["DQ_ACC"] if kernel == "dkdv-atomic" else []),
        "prune_configs_by": {"early_config_prune": _make_pruner(kernel)},
    }
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kwargs["do_bench"] = _time_candidates
    return triton.autotune(**kwargs)


# Whether the last pruning left one candidate (pinned, INTERVAL_ATTENTION_AUTOTUNE=0, the interpreter).
_LONE_CANDIDATE = False


def _time_candidates(fn, quantiles=None):
    """The autotuner's timer. A lone candidate needs no timing: Triton 3.8 skips it, but 3.6 (torch
    2.11's) times it anyway. On a GPU that is _time_ms's 20 ms of cache-flushed launches per new shape
    (the GPU tests pin one config per kernel); in the CPU interpreter it fails, through a GPU driver
    that is not there ("0 active drivers"). Its placeholder NaN is "not timed": _log_tuning skips it."""
    if _LONE_CANDIDATE:
        return [math.nan] * len(quantiles) if quantiles else math.nan
    return _time_ms(fn, quantiles)


def _time_ms(fn, quantiles=None):
    """Device milliseconds of ``fn`` (Triton's do_bench, kept short: GPU sessions are minutes long)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# ----------------------------------------------------------------------------------------------------------
# The tile plan, shared by the forward kernel, the dQ kernel and plan_tiles
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32 (acc may be None). "upcast" multiplies in fp32: Triton's CPU interpreter
    mishandles bf16 operands (it hands their raw bits to numpy), and bf16 values are exact in fp32."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_intervals(LO, HI, b, offs_m, LQ, LK):
    """The rows' intervals clipped to [0, LK); rows past LQ get the empty interval [1, 0]."""
    in_q = offs_m < LQ
    lo = tl.load(LO + b * LQ + offs_m, mask=in_q, other=1)
    hi = tl.load(HI + b * LQ + offs_m, mask=in_q, other=0)
    return tl.maximum(lo, 0), tl.minimum(hi, LK - 1)


@triton.jit
def _query_block_plan(lo_c, hi_c, BLOCK_N: tl.constexpr):
    """Key-block ranges of one query block: [n_lo, n_hi) to visit, [f_lo, f_hi) of it needing no mask."""
    valid = lo_c <= hi_c
    kmin = tl.min(tl.where(valid, lo_c, 1073741824), 0)
    kmax = tl.max(tl.where(valid, hi_c, -1), 0)
    maxlo = tl.max(tl.where(valid, lo_c, -1), 0)
    minhi = tl.min(tl.where(valid, hi_c, 1073741824), 0)
    some = kmax >= 0  # clipped intervals are inside [0, LK), so this is "some row is not empty"
    n_lo = tl.where(some, kmin // BLOCK_N, 0)
    n_hi = tl.where(some, kmax // BLOCK_N + 1, 0)
    # Full: the whole block [n * BN, (n + 1) * BN - 1] lies in [maxlo, minhi] (and so inside [0, LK)).
    f_lo = tl.minimum(tl.maximum((maxlo + BLOCK_N - 1) // BLOCK_N, n_lo), n_hi)
    f_hi = tl.minimum(tl.maximum((minhi + 1) // BLOCK_N, f_lo), n_hi)
    return n_lo, f_lo, f_hi, n_hi


@triton.jit
def _tile_live(lo_c, hi_c, blk, LK, BLOCK_N: tl.constexpr):
    """Does any row's interval meet key block ``blk``? (Edge tiles only; full tiles always do.)"""
    first = blk * BLOCK_N
    last = tl.minimum(first + BLOCK_N, LK) - 1
    hit = (lo_c <= last) & (hi_c >= first) & (lo_c <= hi_c)
    return tl.max(hit.to(tl.int32), 0) > 0


@triton.jit
def _program_block(ORDER, ORDER_STRIDE, ORDERED, n_blocks, H, BLOCK: tl.constexpr):
    """(b, b * H + h, block) of this program. ORDERED: the launch-order table's row for this block size
    (kernels/work_order.py), every head of an entry in turn. Otherwise the natural order: blocks fastest,
    then heads. A runtime flag, not a constexpr, so both orders run the same binary (benchmarks compare
    them without a recompile); the natural order reads, and ignores, ORDER's first entry."""
    p = tl.program_id(0)
    row = (BLOCK >= 32) + (BLOCK >= 64) + (BLOCK >= 128) + (BLOCK >= 256)  # log2(BLOCK / 16)
    entry = tl.load(ORDER + row * ORDER_STRIDE + (p // H) * ORDERED)
    b_ordered = (entry // n_blocks).to(tl.int64)
    bh_natural = (p // n_blocks).to(tl.int64)
    b = tl.where(ORDERED != 0, b_ordered, bh_natural // H)
    bh = tl.where(ORDERED != 0, b_ordered * H + p % H, bh_natural)
    blk = tl.where(ORDERED != 0, entry % n_blocks, p % n_blocks)
    return b, bh, blk


@triton.jit
def _plan_kernel(LO, HI, COUNTS, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per query block: number of computed tiles and number of full tiles, exactly as _fwd_kernel."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo_c, hi_c = _load_intervals(LO, HI, b, offs_m, LQ, LK)
    n_lo, f_lo, f_hi, n_hi = _query_block_plan(lo_c, hi_c, BLOCK_N)
    live = n_lo * 0
    for blk in range(n_lo, f_lo):
        live += _tile_live(lo_c, hi_c, blk, LK, BLOCK_N).to(tl.int32)
    for blk in range(f_hi, n_hi):
        live += _tile_live(lo_c, hi_c, blk, LK, BLOCK_N).to(tl.int32)
    out = COUNTS + (b * tl.num_programs(0) + pid_m) * 2
    tl.store(out, live + (f_hi - f_lo))
    tl.store(out + 1, f_hi - f_lo)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, desc, row0, offs, blk, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
               MASKED: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """Rows ``offs`` (block ``blk``) of one head's (n_rows, HEAD_DIM) matrix. Edge tiles load with a row
    mask; full tiles lie inside [0, n_rows) and load unmasked, through TMA when the config says so (the
    descriptor spans all heads' rows, so rows are offset by the head's first row ``row0``)."""
    if MASKED:
        off = offs[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        return tl.load(base + off, mask=(offs < n_rows)[:, None], other=0.0)
    elif USE_TMA:
        return desc.load([row0 + blk * BLOCK, 0])
    else:
        return tl.load(base + offs[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _load_kv(k_base, v_base, desc_k, desc_v, row0, offs_n, blk, LK, HEAD_DIM: tl.constexpr,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    k = _load_rows(k_base, desc_k, row0, offs_n, blk, LK, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
    v = _load_rows(v_base, desc_v, row0, offs_n, blk, LK, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
    return k, v


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, row0, lo_c, hi_c, blk, qk_scale, LK,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over key block ``blk`` (log2 domain: exp2 with log2(e) folded in)."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_base, v_base, desc_k, desc_v, row0, offs_n, blk, LK, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
    s = _mma(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
    if MASKED:
        allowed = (offs_n[None, :] >= lo_c[:, None]) & (offs_n[None, :] <= hi_c[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, l_i, m_new


@_autotune("fwd")
@triton.jit(do_not_specialize=["H", "LQ", "LK", "ORDER_STRIDE", "ORDERED", "LQ_KEY", "LK_KEY", "TUNE_TAG"])
def _fwd_kernel(
    Q, K, V, DESC_K, DESC_V, O, LSE, LO, HI, ORDER, COUNTER, qk_scale, H, LQ, LK, ORDER_STRIDE, ORDERED,
    LQ_KEY, LK_KEY, TUNE_TAG,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    b, bh, pid_m = _program_block(ORDER, ORDER_STRIDE, ORDERED, tl.cdiv(LQ, BLOCK_M), H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < LQ
    lo_c, hi_c = _load_intervals(LO, HI, b, offs_m, LQ, LK)
    n_lo, f_lo, f_hi, n_hi = _query_block_plan(lo_c, hi_c, BLOCK_N)

    q_off = bh * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=in_q[:, None], other=0.0)
    k_base = K + bh * LK * HEAD_DIM
    v_base = V + bh * LK * HEAD_DIM
    row0 = (bh * LK).to(tl.int32)  # this head's first row in the TMA descriptors
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # fmt: off
    # Left edge: masked tiles, skipped when no row's interval meets them.
    for blk in range(n_lo, f_lo):
        if _tile_live(lo_c, hi_c, blk, LK, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, DESC_K, DESC_V, row0, lo_c, hi_c,
                                      blk, qk_scale, LK, HEAD_DIM, BLOCK_N, True, DOT_PRECISION, USE_TMA)
            if COUNT_TILES:
                tl.atomic_add(COUNTER, 1)
    # Middle: tiles inside every row's interval, no mask arithmetic.
    for blk in range(f_lo, f_hi):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, DESC_K, DESC_V, row0, lo_c, hi_c,
                                  blk, qk_scale, LK, HEAD_DIM, BLOCK_N, False, DOT_PRECISION, USE_TMA)
    # Right edge: masked again (the diagonal of causal text, the ends of images).
    for blk in range(f_hi, n_hi):
        if _tile_live(lo_c, hi_c, blk, LK, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, DESC_K, DESC_V, row0, lo_c, hi_c,
                                      blk, qk_scale, LK, HEAD_DIM, BLOCK_N, True, DOT_PRECISION, USE_TMA)
            if COUNT_TILES:
                tl.atomic_add(COUNTER, 1)
    if COUNT_TILES:
        tl.atomic_add(COUNTER, f_hi - f_lo)
        tl.atomic_add(COUNTER + 1, f_hi - f_lo)

    # fmt: on
    valid = lo_c <= hi_c
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = tl.where(valid[:, None], acc / l_safe[:, None], 0.0)
    # Empty rows get lse = +inf, which makes their backward probabilities exp2(s - lse) exactly 0.
    lse = tl.where(valid, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(O + q_off, out.to(O.dtype.element_ty), mask=in_q[:, None])
    tl.store(LSE + bh * LQ + offs_m, lse, mask=in_q)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, LQ, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d O[i, d] * dO[i, d] (the softmax-Jacobian correction term)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < LQ
    off = bh * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + off, mask=in_q[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=in_q[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * LQ + offs_m, tl.sum(o * do, 1), mask=in_q)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q, DO, desc_q, desc_do, LSE, DELTA, DQ_ACC, bh, blk, offs_n, lo_c, hi_c, qk_scale, LQ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA_ROWS: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_T: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over query block ``blk`` (computed transposed: keys x queries).
    ``TMA_ROWS``: the block lies inside [0, LQ) and q, dO come through the TMA descriptors. ``DQ_ATOMIC``:
    also add this tile's share of dQ (dS @ K, unscaled) to the fp32 buffer ``DQ_ACC`` with atomics."""
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    in_q = offs_m < LQ
    q_base = Q + bh * LQ * HEAD_DIM
    do_base = DO + bh * LQ * HEAD_DIM
    row0 = (bh * LQ).to(tl.int32)
    # Query blocks may run past LQ even where the mask is full, so only TMA_ROWS blocks load unmasked.
    q = _load_rows(q_base, desc_q, row0, offs_m, blk, LQ, HEAD_DIM, BLOCK_M, not TMA_ROWS, TMA_ROWS)
    do = _load_rows(do_base, desc_do, row0, offs_m, blk, LQ, HEAD_DIM, BLOCK_M, not TMA_ROWS, TMA_ROWS)
    lse = tl.load(LSE + bh * LQ + offs_m, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + offs_m, mask=in_q, other=0.0)
    s_t = _mma(k, tl.trans(q), None, DOT_PRECISION) * qk_scale
    if MASKED:
        allowed = (offs_n[:, None] >= lo_c[None, :]) & (offs_n[:, None] <= hi_c[None, :])
        s_t = tl.where(allowed, s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse[None, :])
    dv = _mma(p_t.to(do.dtype), do, dv, DOT_PRECISION)
    dp_t = _mma(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
    if DQ_ATOMIC:
        # Every key block adds to the same dQ rows, in no fixed order: fp32 atomics, relaxed (no fences;
        # nothing reads dQ before the kernel ends).
        dq_base = DQ_ACC + bh * LQ * HEAD_DIM
        offs_d = tl.arange(0, HEAD_DIM)
        if DQ_T:  # dQ^T = K^T dS^T: HEAD_DIM rows, so Hopper's wgmma (M >= 64) takes it when BLOCK_M < 64
            dq_t = _mma(tl.trans(k), ds_t.to(k.dtype), None, DOT_PRECISION)
            dq_ptr = dq_base + offs_m[None, :] * HEAD_DIM + offs_d[:, None]
            tl.atomic_add(dq_ptr, dq_t, mask=in_q[None, :], sem="relaxed")
        else:
            dq = _mma(tl.trans(ds_t.to(k.dtype)), k, None, DOT_PRECISION)
            dq_ptr = dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            tl.atomic_add(dq_ptr, dq, mask=in_q[:, None], sem="relaxed")
    return dk, dv


@_autotune("dkdv")
@triton.jit(
    do_not_specialize=["H", "LQ", "LK", "NT", "ORDER_STRIDE", "ORDERED", "LQ_KEY", "LK_KEY", "TUNE_TAG"]
)
def _bwd_dkdv_kernel(
    Q, K, V, DO, DESC_Q, DESC_DO, DK, DV, DQ_ACC, LSE, DELTA, LO, HI, KTAB, ORDER, COUNTER, sm_scale,
    qk_scale, H, LQ, LK, NT, ORDER_STRIDE, ORDERED, LQ_KEY, LK_KEY, TUNE_TAG,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr, CHUNK_: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    DQ_T: tl.constexpr,
):  # fmt: skip
    b, bh, pid_n = _program_block(ORDER, ORDER_STRIDE, ORDERED, tl.cdiv(LK, BLOCK_N), H, BLOCK_N)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n < LK
    kv_off = bh * LK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_off, mask=in_k[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=in_k[:, None], other=0.0)

    # Query-block ranges from the key-major table (see key_major_table): chunk counts -> block indices.
    tab = KTAB + b * NT * 4
    t0 = start_n // CHUNK_
    t1 = (start_n + BLOCK_N) // CHUNK_
    c_first = tl.load(tab + t0 * 4 + 0)
    c_end = tl.load(tab + t1 * 4 + 1)
    c_full_first = tl.load(tab + t1 * 4 + 2)
    c_full_end = tl.load(tab + t0 * 4 + 3)
    R = BLOCK_M // CHUNK_
    n_chunks = tl.cdiv(LQ, CHUNK_)
    n_mblocks = tl.cdiv(LQ, BLOCK_M)
    m_lo = tl.where(c_first < n_chunks, c_first // R, n_mblocks)
    m_hi = tl.maximum((c_end + R - 1) // R, m_lo)
    f_lo = tl.minimum(tl.maximum((c_full_first + R - 1) // R, m_lo), m_hi)
    f_hi = tl.minimum(tl.maximum(tl.where(c_full_end < n_chunks, c_full_end // R, n_mblocks), f_lo), m_hi)

    # fmt: off
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for blk in range(m_lo, f_lo):
        lo_c, hi_c = _load_intervals(LO, HI, b, blk * BLOCK_M + tl.arange(0, BLOCK_M), LQ, LK)
        if _tile_live(lo_c, hi_c, pid_n, LK, BLOCK_N):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, DESC_Q, DESC_DO, LSE, DELTA, DQ_ACC, bh, blk, offs_n,
                                lo_c, hi_c, qk_scale, LQ, HEAD_DIM, BLOCK_M, True, DOT_PRECISION, False,
                                DQ_ATOMIC, DQ_T)
            if COUNT_TILES:
                tl.atomic_add(COUNTER, 1)
    f_mid = f_lo  # full tiles [f_lo, f_mid) load through TMA: those whose query block ends inside LQ
    if USE_TMA:
        f_mid = tl.maximum(tl.minimum(f_hi, LQ // BLOCK_M), f_lo)
        for blk in range(f_lo, f_mid):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, DESC_Q, DESC_DO, LSE, DELTA, DQ_ACC, bh, blk, offs_n,
                                offs_n, offs_n, qk_scale, LQ, HEAD_DIM, BLOCK_M, False, DOT_PRECISION, True,
                                DQ_ATOMIC, DQ_T)
    for blk in range(f_mid, f_hi):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, DESC_Q, DESC_DO, LSE, DELTA, DQ_ACC, bh, blk, offs_n,
                            offs_n, offs_n, qk_scale, LQ, HEAD_DIM, BLOCK_M, False, DOT_PRECISION, False,
                            DQ_ATOMIC, DQ_T)
    for blk in range(f_hi, m_hi):
        lo_c, hi_c = _load_intervals(LO, HI, b, blk * BLOCK_M + tl.arange(0, BLOCK_M), LQ, LK)
        if _tile_live(lo_c, hi_c, pid_n, LK, BLOCK_N):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, DESC_Q, DESC_DO, LSE, DELTA, DQ_ACC, bh, blk, offs_n,
                                lo_c, hi_c, qk_scale, LQ, HEAD_DIM, BLOCK_M, True, DOT_PRECISION, False,
                                DQ_ATOMIC, DQ_T)
            if COUNT_TILES:
                tl.atomic_add(COUNTER, 1)
    if COUNT_TILES:
        tl.atomic_add(COUNTER, f_hi - f_lo)
        tl.atomic_add(COUNTER + 1, f_hi - f_lo)

    # fmt: on
    dk = dk * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


# The atomic scheme's dK/dV kernel: the same function under its own autotuner (own candidates, own cache).
_bwd_dkdv_atomic_kernel = _autotune("dkdv-atomic")(_bwd_dkdv_kernel.fn)


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, k_base, v_base, desc_k, desc_v, row0, lo_c, hi_c, blk, qk_scale, LK,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_base, v_base, desc_k, desc_v, row0, offs_n, blk, LK, HEAD_DIM, BLOCK_N, MASKED, USE_TMA)
    s = _mma(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
    if MASKED:
        allowed = (offs_n[None, :] >= lo_c[:, None]) & (offs_n[None, :] <= hi_c[:, None])
        s = tl.where(allowed, s, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    dp = _mma(do, tl.trans(v), None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = _mma(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq


@_autotune("dq")
@triton.jit(do_not_specialize=["H", "LQ", "LK", "ORDER_STRIDE", "ORDERED", "LQ_KEY", "LK_KEY", "TUNE_TAG"])
def _bwd_dq_kernel(
    Q, K, V, DESC_K, DESC_V, DO, DQ, LSE, DELTA, LO, HI, ORDER, COUNTER, sm_scale, qk_scale, H, LQ, LK,
    ORDER_STRIDE, ORDERED, LQ_KEY, LK_KEY, TUNE_TAG,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    b, bh, pid_m = _program_block(ORDER, ORDER_STRIDE, ORDERED, tl.cdiv(LQ, BLOCK_M), H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < LQ
    lo_c, hi_c = _load_intervals(LO, HI, b, offs_m, LQ, LK)
    n_lo, f_lo, f_hi, n_hi = _query_block_plan(lo_c, hi_c, BLOCK_N)

    q_off = bh * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=in_q[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + bh * LQ + offs_m, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + offs_m, mask=in_q, other=0.0)
    k_base = K + bh * LK * HEAD_DIM
    v_base = V + bh * LK * HEAD_DIM
    row0 = (bh * LK).to(tl.int32)
    # fmt: off
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for blk in range(n_lo, f_lo):
        if _tile_live(lo_c, hi_c, blk, LK, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, DESC_K, DESC_V, row0, lo_c, hi_c, blk,
                          qk_scale, LK, HEAD_DIM, BLOCK_N, True, DOT_PRECISION, USE_TMA)
            if COUNT_TILES:
                tl.atomic_add(COUNTER, 1)
    for blk in range(f_lo, f_hi):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, DESC_K, DESC_V, row0, lo_c, hi_c, blk,
                      qk_scale, LK, HEAD_DIM, BLOCK_N, False, DOT_PRECISION, USE_TMA)
    for blk in range(f_hi, n_hi):
        if _tile_live(lo_c, hi_c, blk, LK, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, DESC_K, DESC_V, row0, lo_c, hi_c, blk,
                          qk_scale, LK, HEAD_DIM, BLOCK_N, True, DOT_PRECISION, USE_TMA)
            if COUNT_TILES:
                tl.atomic_add(COUNTER, 1)
    if COUNT_TILES:
        tl.atomic_add(COUNTER, f_hi - f_lo)
        tl.atomic_add(COUNTER + 1, f_hi - f_lo)
    # fmt: on
    dq = dq * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=in_q[:, None])


# ----------------------------------------------------------------------------------------------------------
# Host side: the key-major table
# ----------------------------------------------------------------------------------------------------------
def key_major_table(lo: torch.Tensor, hi: torch.Tensor, kv_len: int) -> torch.Tensor:
    """For every 16-key boundary ``t`` (key ``16 t``), chunk counts from which the dK/dV kernel derives the
    query blocks that see a key block ``[16 t0, 16 t1)``. Returns (B, NT, 4) int32 with, per t:

        0: first query chunk whose left-to-right running max of ``hi`` reaches key 16 t
        1: number of chunks whose right-to-left running min of ``lo`` is <= min(16 t, kv_len) - 1
        2: first chunk whose right-to-left running min of ``hi`` reaches key 16 t - 1
        3: number of chunks whose left-to-right running max of ``lo`` is <= 16 t

    (intervals clipped to [0, kv_len), empty rows ignored). With ``R = BLOCK_M / 16`` the kernel visits
    query blocks [c0 // R, ceil(c1 / R)) and treats [ceil(c2 / R), c3 // R) as full; see the module doc.
    It depends only on the layout, so callers that reuse one layout (every layer of a model) can build
    it once and pass it to :func:`interval_attention` (``kv_table``), as FlexAttention reuses a BlockMask.
    """
    bsz = lo.shape[0]
    lo_c, hi_c, valid = blocked_intervals(lo, hi, kv_len, CHUNK)
    big = torch.full_like(lo_c, _BIG)
    neg = torch.full_like(lo_c, -1)
    kmin = torch.where(valid, lo_c, big).amin(-1)
    kmax = torch.where(valid, hi_c, neg).amax(-1)
    maxlo = torch.where(valid, lo_c, neg).amax(-1)
    minhi = torch.where(valid, hi_c, big).amin(-1)
    env_kmax = kmax.cummax(-1).values.contiguous()
    env_maxlo = maxlo.cummax(-1).values.contiguous()
    env_kmin = kmin.flip(-1).cummin(-1).values.flip(-1).contiguous()
    env_minhi = minhi.flip(-1).cummin(-1).values.flip(-1).contiguous()

    n_t = triton.cdiv(kv_len, CHUNK) + 1 + _MAX_BLOCK // CHUNK
    keys = (torch.arange(n_t, device=lo.device, dtype=torch.int32) * CHUNK).expand(bsz, n_t).contiguous()
    ends = keys.clamp(max=kv_len) - 1
    cols = [
        torch.searchsorted(env_kmax, keys, side="left", out_int32=True),
        torch.searchsorted(env_kmin, ends.contiguous(), side="right", out_int32=True),
        torch.searchsorted(env_minhi, (keys - 1).contiguous(), side="left", out_int32=True),
        torch.searchsorted(env_maxlo, keys, side="right", out_int32=True),
    ]
    return torch.stack(cols, -1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Testing hooks
# ----------------------------------------------------------------------------------------------------------
_POISON = False
_COUNTS: dict[str, list[int]] | None = None
_DUMMIES: dict[tuple[str, torch.device], torch.Tensor] = {}
_BACKWARD_CHOICE: dict[tuple, str] = {}
_TUNED_BLOCKS: dict[tuple, tuple[int, int]] = {}
_TUNING_LOG: list[dict] = []
_LAST_TIMINGS: dict[str, object] = {}
_LAUNCHED: dict[str, tuple] = {}


@contextmanager
def kernel_configs(tma: bool | None = None, index: int | None = None) -> Iterator[None]:
    """Restrict the kernels' candidate configs inside the context (tests and benchmarks).

    ``tma=True`` keeps only the TMA candidates (an error where TMA cannot run: no CUDA capability >= 9,
    fp32, or an old Triton; under the interpreter it runs the TMA code path), ``tma=False`` only the
    pointer ones, ``None`` both where TMA can run. ``index=i`` pins the i-th remaining candidate of each
    kernel (clamped to the last), so a test can run every candidate without autotuning.
    """
    global _TMA_MODE, _PIN_INDEX
    if index is not None and index < 0:
        raise ValueError(f"index = {index} must be >= 0")
    old = _TMA_MODE, _PIN_INDEX
    _TMA_MODE, _PIN_INDEX = tma, index
    try:
        yield
    finally:
        _TMA_MODE, _PIN_INDEX = old


def candidate_count(kernel: str, dtype: torch.dtype, head_dim: int, tma: bool | None = None) -> int:
    """How many candidate configs ``kernel`` ("fwd", "dkdv", "dkdv-atomic", "dq") has on CUDA for this dtype
    and head dim (``tma``: only TMA / only pointer candidates / all)."""
    cands = _GPU_CANDIDATES[kernel][(_dtype_class(dtype), head_dim)]
    return sum(1 for c in cands if (tma is None or c[4] == tma) and not _excluded(kernel, dtype, head_dim, c))


def planned_configs(dtype: torch.dtype, head_dim: int, device: torch.device, mode: str) -> dict[str, str]:
    """The config each kernel of one call will run with under the current pinning (``kernel_configs(...,
    index=i)``) and backward ``mode`` ("split" or "atomic"), by name, known before the launch: a checker
    can then name the configs of a call that kills the process. Empty when nothing is pinned (the
    autotuner decides)."""
    if _PIN_INDEX is None:
        return {}
    descriptors = _uses_descriptors(torch.empty(1, dtype=dtype, device=device))  # as the launch decides
    kernels = ["fwd"] + (["dkdv-atomic"] if mode == "atomic" else ["dkdv", "dq"])
    return {k: config_name(_candidates(k, dtype, head_dim, descriptors)[0]) for k in kernels}


def tuning_log() -> list[dict]:
    """Every autotuning this process ran: one dict per (kernel, tuning key, candidate config) with its
    median milliseconds and whether it was chosen. The GPU sweep writes it next to its results."""
    return [dict(r) for r in _TUNING_LOG]


def _tune_tag() -> int:
    """Autotuning cache key of the current restriction, so that restricted runs do not reuse a choice."""
    mode = 0 if _TMA_MODE is None else (1 if _TMA_MODE else 2)
    return mode + 3 * (0 if _PIN_INDEX is None else _PIN_INDEX + 1)


def launched_configs(reset: bool = False) -> dict[str, tuple]:
    """The config each kernel ("fwd", "dkdv", "dkdv-atomic", "dq") ran with at its latest launch, as
    (BLOCK_M, BLOCK_N, warps, stages, tma[, dQ transposed]); ``reset`` forgets them afterwards, so a
    checker can tell which kernels one call launched (bench kernel-check)."""
    out = dict(_LAUNCHED)
    if reset:
        _LAUNCHED.clear()
    return out


def _log_tuning(name: str, kernel, head_dim: int, dtype: torch.dtype, q_len: int, kv_len: int) -> None:
    best = getattr(kernel, "best_config", None)
    if best is not None:
        _LAUNCHED[name] = _config_key(best)
    timings = getattr(kernel, "configs_timings", None)
    if not timings or timings is _LAST_TIMINGS.get(name):
        return
    _LAST_TIMINGS[name] = timings
    for cfg, t in timings.items():
        ms = t[0] if isinstance(t, (list, tuple)) else t
        if math.isnan(ms):  # a lone candidate's placeholder (_time_candidates): nothing was timed
            continue
        bm, bn, warps, stages, tma, *dq_t = _config_key(cfg)
        _TUNING_LOG.append(
            dict(
                kernel=name, head_dim=head_dim, dtype=str(dtype).removeprefix("torch."),
                q_bucket=_bucket(q_len), kv_bucket=_bucket(kv_len), block_m=bm, block_n=bn,
                warps=warps, stages=stages, tma=tma, ms=float(ms), chosen=cfg is best,
                **({"dq_transposed": dq_t[0]} if dq_t else {}),
            )
        )  # fmt: skip


def _tma_possible(x: torch.Tensor) -> bool:
    if _TensorDescriptor is None or not x.is_cuda or x.dtype == torch.float32:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def _uses_descriptors(x: torch.Tensor) -> bool:
    """Whether launches on tensors like ``x`` get TMA descriptors (so the TMA candidates are in play)
    under the current restriction; kernel_configs(tma=True) where TMA cannot run is an error."""
    use = _TMA_MODE is not False and bool(_TMA_MODE if INTERPRET else _tma_possible(x))
    if _TMA_MODE and not use:
        raise ValueError(
            "kernel_configs(tma=True): the TMA variant needs CUDA capability >= 9, fp16/bf16 inputs and "
            f"Triton's TensorDescriptor; got {x.device}, {x.dtype}"
        )
    return use


def _descriptors(*tensors: torch.Tensor) -> tuple:
    """TMA descriptors over the (B*H*L, D) rows of each tensor when the TMA variant is in play, else the
    tensors themselves (the pointer configs never touch these arguments). The block shape is a
    placeholder that each config's pre-hook sets."""
    if not _uses_descriptors(tensors[0]):
        return tensors
    head_dim = tensors[0].shape[-1]
    return tuple(
        _TensorDescriptor(t, [t.numel() // head_dim, head_dim], [head_dim, 1], [CHUNK, head_dim])
        for t in tensors
    )


@contextmanager
def _module_setting(name: str, value: str, allowed: tuple[str, ...], what: str) -> Iterator[None]:
    """Set the module global ``name`` to ``value`` (one of ``allowed``) inside the context."""
    if value not in allowed:
        raise ValueError(f"{what} = {value!r}; use one of {allowed}")
    old, globals()[name] = globals()[name], value
    try:
        yield
    finally:
        globals()[name] = old


def program_order(order: str) -> AbstractContextManager[None]:
    """Launch the kernels' programs in ``order`` inside the context: "heaviest-first" (the default, see
    kernels/work_order.py) or "natural". Benchmarks compare the two; outputs are bitwise the same."""
    return _module_setting("_ORDER", order, ORDERS, "order")


def backward_mode(mode: str) -> AbstractContextManager[None]:
    """Compute gradients with backward scheme ``mode`` inside the context: "auto" (the default), "split"
    or "atomic" (see BACKWARD_MODES). The environment variable INTERVAL_ATTENTION_BACKWARD sets it too."""
    return _module_setting("_BACKWARD", mode, BACKWARD_MODES, "mode")


def _resolve_backward(q: torch.Tensor) -> str:
    """The scheme this backward pass uses: "split", "atomic", or "auto" (to be timed)."""
    if _BACKWARD not in BACKWARD_MODES:
        raise ValueError(f"INTERVAL_ATTENTION_BACKWARD = {_BACKWARD!r}; use one of {BACKWARD_MODES}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    if _BACKWARD == "atomic" and deterministic:
        raise RuntimeError(
            "backward mode 'atomic' sums dQ with atomics, in no fixed order, but "
            "torch.use_deterministic_algorithms(True) is set; use backward_mode('split')"
        )
    if _BACKWARD != "auto":
        return _BACKWARD
    # Timing runs the backward pass many times and synchronizes: not while counting tiles (each run would
    # add to the counts) nor inside a CUDA graph capture.
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if INTERPRET or deterministic or q.dtype == torch.float32 or _COUNTS is not None or capturing:
        return "split"
    if _EXCLUDED:  # exclusions may leave the atomic scheme's dK/dV kernel nothing to run: then split
        try:
            _candidates("dkdv-atomic", q.dtype, q.shape[-1], _uses_descriptors(q))
        except ValueError:
            return "split"
    return "auto"


def _choose_backward(args: tuple, head_dim: int, dtype: torch.dtype, q_len: int, kv_len: int) -> str:
    """Time the split and atomic backward passes once per shape key (after a run of each, which compiles
    and autotunes its kernels) and keep the faster; both timings go to the tuning log. The key holds the
    (bucketed) number of batch rows x heads, since how many programs run at once decides the race. Out of
    memory while timing (the atomic scheme's fp32 dQ buffer, the timer's cache-flush buffer): split."""
    q = args[1]
    natural_order = args[-1] is None  # the last argument of _backward is the launch-order table
    rows = _bucket(q.shape[0] * q.shape[1])
    key = (head_dim, dtype, _bucket(q_len), _bucket(kv_len), rows, _tune_tag(), natural_order)
    if key not in _BACKWARD_CHOICE:
        runs = {m: functools.partial(_backward, *args, atomic_dq=m == "atomic") for m in ("split", "atomic")}
        try:
            for run in runs.values():
                run()
            ms = {mode: float(_time_ms(run)) for mode, run in runs.items()}
        except torch.OutOfMemoryError:
            ms = {mode: float("nan") for mode in runs}
        best = min(ms, key=ms.get) if all(t == t for t in ms.values()) else "split"
        _BACKWARD_CHOICE[key] = best
        for mode, t in ms.items():
            _TUNING_LOG.append(
                dict(
                    kernel="backward", head_dim=head_dim, dtype=str(dtype).removeprefix("torch."),
                    q_bucket=_bucket(q_len), kv_bucket=_bucket(kv_len), rows_bucket=rows, scheme=mode,
                    ms=t, chosen=mode == best,
                )
            )  # fmt: skip
    return _BACKWARD_CHOICE[key]


def backward_choices() -> dict[tuple, str]:
    """The scheme "auto" chose per (head dim, dtype, Lq bucket, Lk bucket, B x H bucket, restriction,
    natural order)."""
    return dict(_BACKWARD_CHOICE)


@contextmanager
def poison_outputs() -> Iterator[None]:
    """Inside this context every buffer the kernels write (O, LSE, delta, dQ, dK, dV) starts out NaN, so a
    test can check that the kernels write every element."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


@contextmanager
def count_tiles() -> Iterator[dict[str, list[int]]]:
    """Inside this context the kernels count the tiles they compute (summed over batch rows and heads):
    ``{"fwd": [computed, full], "dkdv": [...], "dq": [...]}``. Testing only (atomics, recompiles)."""
    global _COUNTS
    old = _COUNTS
    _COUNTS = {"fwd": [0, 0], "dkdv": [0, 0], "dq": [0, 0]}
    try:
        yield _COUNTS
    finally:
        _COUNTS = old


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# The stand-in buffers of arguments a launch does not use, one per kind and device, made once. The
# autotuner zeroes them (reset_to_zero), so each kind keeps its own.
_DUMMY_SHAPES: dict[str, tuple[int, torch.dtype]] = {
    "counter": (2, torch.int32),
    "dq_acc": (1, torch.float32),
}


def _dummy(kind: str, device: torch.device) -> torch.Tensor:
    if (kind, device) not in _DUMMIES:
        size, dtype = _DUMMY_SHAPES[kind]
        _DUMMIES[kind, device] = torch.zeros(size, dtype=dtype, device=device)
    return _DUMMIES[kind, device]


def _counter(device: torch.device) -> torch.Tensor:
    if _COUNTS is not None:
        return torch.zeros(2, dtype=torch.int32, device=device)
    return _dummy("counter", device)


def _record_count(name: str, counter: torch.Tensor) -> None:
    if _COUNTS is not None:
        got = counter.tolist()
        _COUNTS[name][0] += int(got[0])
        _COUNTS[name][1] += int(got[1])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    if INTERPRET and dtype == torch.bfloat16:
        return "upcast"
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def _remember_blocks(kernel, head_dim: int, dtype: torch.dtype, q_len: int, kv_len: int) -> None:
    cfg = getattr(kernel, "best_config", None)
    if cfg is not None and "BLOCK_M" in cfg.kwargs:
        blocks = (int(cfg.kwargs["BLOCK_M"]), int(cfg.kwargs["BLOCK_N"]))
        _TUNED_BLOCKS[(head_dim, dtype, _bucket(q_len), _bucket(kv_len))] = blocks
        _TUNED_BLOCKS[(head_dim, dtype)] = blocks


def _order_args(order: torch.Tensor | None, side: int, fallback: torch.Tensor) -> tuple:
    """(ORDER, ORDER_STRIDE, ORDERED) kernel arguments: one side of the launch-order table, or natural
    order (``fallback`` is any non-empty int32 tensor on the device: the kernel reads its first entry and
    ignores it)."""
    if order is None:
        return fallback, 0, 0
    return order[side], order.shape[2], 1


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: float,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, n_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    o = _empty(tuple(q.shape), q.dtype, q.device)
    lse = _empty((bsz, n_heads, q_len), torch.float32, q.device)
    counter = _counter(q.device)
    order_t, order_stride, ordered = _order_args(order, 0, lo)

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]) * bsz * n_heads,)

    desc_k, desc_v = _descriptors(k, v)
    _fwd_kernel[grid](
        q, k, v, desc_k, desc_v, o, lse, lo, hi, order_t, counter, scale * _LOG2E, n_heads, q_len, kv_len,
        order_stride, ordered, _bucket(q_len), _bucket(kv_len), _tune_tag(),
        HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype), COUNT_TILES=_COUNTS is not None,
    )  # fmt: skip
    _remember_blocks(_fwd_kernel, head_dim, q.dtype, q_len, kv_len)
    _log_tuning("fwd", _fwd_kernel, head_dim, q.dtype, q_len, kv_len)
    _record_count("fwd", counter)
    return o, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: float,
    kv_table: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    atomic_dq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV. ``atomic_dq``: the dK/dV kernel also accumulates dQ (fp32 atomics) and the dQ kernel
    is skipped; otherwise the dQ kernel recomputes the probabilities (deterministic)."""
    bsz, n_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    dev = q.device
    prec = _dot_precision(q.dtype)
    counting = _COUNTS is not None

    delta = _empty((bsz, n_heads, q_len), torch.float32, dev)
    block = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(q_len, block), bsz * n_heads)](
        o, do, delta, q_len, HEAD_DIM=head_dim, BLOCK_M=block
    )

    dk = _empty(tuple(k.shape), k.dtype, dev)
    dv = _empty(tuple(v.shape), v.dtype, dev)
    table = key_major_table(lo, hi, kv_len) if kv_table is None else kv_table
    counter = _counter(dev)

    order_t, order_stride, ordered = _order_args(order, 1, lo)
    # the atomic dQ accumulator must start at zero; without atomics the kernel never touches it
    if atomic_dq:
        dq_acc = torch.zeros(tuple(q.shape), dtype=torch.float32, device=dev)
    else:
        dq_acc = _dummy("dq_acc", dev)

    def grid_kv(meta):
        return (triton.cdiv(kv_len, meta["BLOCK_N"]) * bsz * n_heads,)

    desc_q, desc_do = _descriptors(q, do)
    name, kernel = ("dkdv-atomic", _bwd_dkdv_atomic_kernel) if atomic_dq else ("dkdv", _bwd_dkdv_kernel)
    # The split scheme's configs have no DQ_T (its dQ code is compiled out): pass it with DQ_ATOMIC.
    scheme = {"DQ_ATOMIC": True} if atomic_dq else {"DQ_ATOMIC": False, "DQ_T": False}
    kernel[grid_kv](
        q, k, v, do, desc_q, desc_do, dk, dv, dq_acc, lse, delta, lo, hi, table, order_t, counter, scale,
        scale * _LOG2E, n_heads, q_len, kv_len, table.shape[1], order_stride, ordered, _bucket(q_len),
        _bucket(kv_len), _tune_tag(),
        HEAD_DIM=head_dim, DOT_PRECISION=prec, COUNT_TILES=counting, CHUNK_=CHUNK, **scheme,
    )  # fmt: skip
    _log_tuning(name, kernel, head_dim, q.dtype, q_len, kv_len)
    _record_count("dkdv", counter)
    if atomic_dq:
        return dq_acc.mul_(scale).to(q.dtype), dk, dv

    dq = _empty(tuple(q.shape), q.dtype, dev)
    counter = _counter(dev)

    order_t, order_stride, ordered = _order_args(order, 0, lo)

    def grid_q(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]) * bsz * n_heads,)

    desc_k, desc_v = _descriptors(k, v)
    _bwd_dq_kernel[grid_q](
        q, k, v, desc_k, desc_v, do, dq, lse, delta, lo, hi, order_t, counter, scale, scale * _LOG2E,
        n_heads, q_len, kv_len, order_stride, ordered, _bucket(q_len), _bucket(kv_len), _tune_tag(),
        HEAD_DIM=head_dim, DOT_PRECISION=prec, COUNT_TILES=counting,
    )  # fmt: skip
    _log_tuning("dq", _bwd_dq_kernel, head_dim, q.dtype, q_len, kv_len)
    _record_count("dq", counter)
    return dq, dk, dv


class _IntervalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lo, hi, scale, kv_table, order):  # type: ignore[override]
        o, lse = _forward(q, k, v, lo, hi, scale, order)
        ctx.save_for_backward(q, k, v, o, lse, lo, hi)
        ctx.scale = scale
        ctx.kv_table = kv_table
        ctx.order = order
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse, lo, hi = ctx.saved_tensors
        args = (do.to(q.dtype).contiguous(), q, k, v, o, lse, lo, hi, ctx.scale, ctx.kv_table, ctx.order)
        mode = _resolve_backward(q)
        if mode == "auto":
            mode = _choose_backward(args, q.shape[-1], q.dtype, q.shape[2], k.shape[2])
        dq, dk, dv = _backward(*args, atomic_dq=mode == "atomic")
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("lo", lo), ("hi", hi)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, L, D) tensor, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype = {t.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    bsz, n_heads, q_len, head_dim = q.shape
    if k.shape[0] != bsz or k.shape[1] != n_heads or k.shape[3] != head_dim:
        raise ValueError(
            f"k.shape = {tuple(k.shape)} does not match q.shape = {tuple(q.shape)} in (B, H, ., D)"
        )
    if v.shape != k.shape:
        raise ValueError(f"v.shape = {tuple(v.shape)} must equal k.shape = {tuple(k.shape)}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D = {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    for name, t in (("lo", lo), ("hi", hi)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name}.dtype = {t.dtype}; it must be torch.int32")
        if tuple(t.shape) != (bsz, q_len):
            raise ValueError(f"{name}.shape = {tuple(t.shape)}; it must be (B, Lq) = {(bsz, q_len)}")
    for name, t in (("k", k), ("v", v), ("lo", lo), ("hi", hi)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; inputs must share a device")
    if not INTERPRET and q.device.type != "cuda":
        raise ValueError(
            f"inputs are on {q.device}, but Triton is compiling for the GPU; move them to CUDA or set "
            "TRITON_INTERPRET=1 before importing kernels (slow, for tests)"
        )
    _check_interpreter()


def _check_interpreter() -> None:
    """Refuse to launch where Triton's CPU interpreter cannot run the kernels (interpreter_problem)."""
    if INTERPRET and (problem := interpreter_problem()):
        raise RuntimeError(problem)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels here, or None. Before 3.7 it turns a loop
    bound held in a 1-element array into an int with int(array), which NumPy 2.4 refuses."""
    import numpy as np

    def release(version: str) -> tuple[int, ...] | None:
        match = re.match(r"(\d+)\.(\d+)", version)
        return tuple(map(int, match.groups())) if match else None

    triton_release, numpy_release = release(triton.__version__), release(np.__version__)
    if triton_release and numpy_release and triton_release < (3, 7) and numpy_release >= (2, 4):
        return (
            f"Triton {triton.__version__}'s CPU interpreter cannot run these kernels with NumPy "
            f"{np.__version__} (it converts 1-element arrays to int, which NumPy 2.4 refuses): install "
            "numpy<2.4, or Triton 3.7 or newer"
        )
    return None


def interval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: float | None = None,
    kv_table: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention where query ``i`` of batch row ``b`` sees keys ``lo[b, i] <= j <= hi[b, i]``.

    Args:
        q: (B, H, Lq, D) queries; k, v: (B, H, Lk, D). fp32, fp16 or bf16 (one dtype); D in {32, 64, 128}.
        lo, hi: (B, Lq) int32 inclusive absolute key indices, non-decreasing along the queries for the
            best tile skipping (any intervals give correct results). ``hi < lo`` marks padding: its output
            row and gradients are zero.
        scale: softmax scale, default ``1 / sqrt(D)``.
        kv_table: ``key_major_table(lo, hi, Lk)`` built beforehand (it is built in every backward pass
            otherwise); it must come from these very ``lo``/``hi``.
        order: ``work_order(lo, hi, Lk, kv_table)`` (kernels/work_order.py) built beforehand: the
            programs then start heaviest first. Without it the call builds one when there are at least
            ``ORDER_MIN_QUERIES`` queries. ``program_order("natural")`` or the environment variable
            ``INTERVAL_ATTENTION_ORDER=natural`` keeps the natural order.

    Returns:
        (B, H, Lq, D) tensor of q's dtype, differentiable in q, k and v.
    """
    _check_inputs(q, k, v, lo, hi)
    if kv_table is not None:
        want = (lo.shape[0], triton.cdiv(k.shape[2], CHUNK) + 1 + _MAX_BLOCK // CHUNK, 4)
        if kv_table.dtype != torch.int32 or tuple(kv_table.shape) != want or kv_table.device != q.device:
            raise ValueError(
                f"kv_table is {tuple(kv_table.shape)} {kv_table.dtype} on {kv_table.device}; it must be "
                f"key_major_table(lo, hi, Lk): {want} torch.int32 on {q.device}"
            )
    if order is not None:
        want = order_shape(lo.shape[0], q.shape[2], k.shape[2])
        if order.dtype != torch.int32 or tuple(order.shape) != want or order.device != q.device:
            raise ValueError(
                f"order is {tuple(order.shape)} {order.dtype} on {order.device}; it must be "
                f"work_order(lo, hi, Lk, kv_table): {want} torch.int32 on {q.device}"
            )
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if q.shape[2] == 0 or k.shape[2] == 0:
        # No queries, or no keys (every interval is empty): a zero output with zero gradients.
        return q * 0.0 + (k.sum() + v.sum()) * 0.0
    lo, hi = lo.contiguous(), hi.contiguous()
    if _ORDER == "natural":
        order = None
    elif order is None and q.shape[2] >= ORDER_MIN_QUERIES:
        if kv_table is None:  # the order's key side reads it; the backward pass then reuses it
            kv_table = key_major_table(lo, hi, k.shape[2])
        order = work_order(lo, hi, k.shape[2], kv_table)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _IntervalAttention.apply(q, k, v, lo, hi, scale, kv_table, order)


def kernel_block_sizes(
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    q_len: int | None = None,
    kv_len: int | None = None,
) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward kernel, for :func:`plan_tiles`.

    Under the interpreter the blocks are fixed. On CUDA the autotuner picks them per (D, dtype, length
    buckets) at the first launch: after a warm-up call this returns the tuned choice (for the given
    lengths, or the latest for this D and dtype), before it the default (first) candidate.
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim = {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype = {dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if INTERPRET or torch.device(device).type != "cuda":
        return _INTERPRETER_BLOCKS
    if q_len is not None and kv_len is not None:
        tuned = _TUNED_BLOCKS.get((head_dim, dtype, _bucket(q_len), _bucket(kv_len)))
        if tuned is not None:
            return tuned
    tuned = _TUNED_BLOCKS.get((head_dim, dtype))
    if tuned is not None:
        return tuned
    bm, bn, *_ = _candidates("fwd", dtype, head_dim, descriptors=False)[0]  # exclusions applied
    return bm, bn


def plan_tiles(lo: torch.Tensor, hi: torch.Tensor, kv_len: int, block_m: int, block_n: int) -> dict[str, int]:
    """Count the (query-block, key-block) tiles of the forward kernel with blocks ``block_m x block_n``.

    Summed over batch rows, per head:
        computed: tiles the kernel computes (exactly the tiles holding at least one allowed pair)
        full:     computed tiles with no mask arithmetic (inside every non-empty row's interval)
        masked:   computed - full
        dense:    tiles of a dense kernel, ceil(Lq / block_m) * ceil(kv_len / block_n) per row
        causal:   tiles of a causal kernel (key block start <= query block end, queries at kv_len - Lq ..)
    It runs the same Triton range functions as the kernel (``_query_block_plan``, ``_tile_live``).
    """
    if not isinstance(lo, torch.Tensor) or not isinstance(hi, torch.Tensor):
        raise ValueError("lo and hi must be torch.Tensors")
    if lo.dtype != torch.int32 or hi.dtype != torch.int32:
        raise ValueError(f"lo.dtype = {lo.dtype}, hi.dtype = {hi.dtype}; both must be torch.int32")
    if lo.dim() != 2 or hi.shape != lo.shape:
        raise ValueError(f"lo.shape = {tuple(lo.shape)}, hi.shape = {tuple(hi.shape)}; need equal (B, Lq)")
    if int(kv_len) < 0:
        raise ValueError(f"kv_len = {kv_len} must be >= 0")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < CHUNK or blk > _MAX_BLOCK or blk & (blk - 1):
            raise ValueError(f"{name} = {blk} must be a power of two in [{CHUNK}, {_MAX_BLOCK}]")
    _check_interpreter()
    kv_len = int(kv_len)
    bsz, q_len = lo.shape
    n_mb = triton.cdiv(q_len, block_m)
    n_nb = triton.cdiv(kv_len, block_n)
    q_offset = kv_len - q_len
    causal = 0
    for m in range(n_mb):
        q_end = q_offset + min((m + 1) * block_m, q_len) - 1
        causal += min(max(q_end // block_n + 1, 0), n_nb) if q_end >= 0 else 0
    result = {
        "computed": 0,
        "full": 0,
        "masked": 0,
        "dense": bsz * n_mb * n_nb,
        "causal": bsz * causal,
        "block_m": block_m,
        "block_n": block_n,
    }
    if bsz == 0 or n_mb == 0 or n_nb == 0:
        return result
    device = lo.device
    if INTERPRET:
        device = torch.device("cpu")
    elif device.type != "cuda":
        device = torch.device("cuda")
    lo_d = lo.to(device).contiguous()
    hi_d = hi.to(device).contiguous()
    counts = torch.zeros((bsz, n_mb, 2), dtype=torch.int32, device=device)
    _plan_kernel[(n_mb, bsz)](lo_d, hi_d, counts, q_len, kv_len, BLOCK_M=block_m, BLOCK_N=block_n)
    computed, full = (int(x) for x in counts.sum(dim=(0, 1)).tolist())
    result.update(computed=computed, full=full, masked=computed - full)
    return result
