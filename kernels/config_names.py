"""How a candidate config of the interval kernel is written in logs, checks, exclusions and reports, and
the length bucket its autotuner keys choices by.

One spelling everywhere matters: the summary matches the autotuner's choices (kernel_tuning.csv) against
the configs bench kernel-check found wrong, and INTERVAL_ATTENTION_EXCLUDE names configs the same way.
No Triton needed, so the report builders can use it on any machine.
"""

from __future__ import annotations


def config_name(cfg: tuple) -> str:
    """``(BLOCK_M, BLOCK_N, warps, stages, tma[, dQ transposed])`` as ``32x128 w8 s3 tma``,
    ``16x128 w8 s3 dqT``."""
    bm, bn, warps, stages, tma, *dq_t = cfg
    return f"{bm}x{bn} w{warps} s{stages}" + (" tma" if tma else "") + (" dqT" if dq_t and dq_t[0] else "")


def length_bucket(n: int) -> int:
    """The autotuner's key for a length: the next power of two (at least 16). The summary uses it to find
    the tuning log's rows of a swept length."""
    return max(16, 1 << max(0, n - 1).bit_length())
