"""A model of what the heaviest-first launch order (kernels/work_order.py) saves, without a GPU.

For benchmark layouts it takes each kernel's programs with their work as the launch-order table measures
it (keys spanned by a query block for the forward and dQ kernels, query chunks for a dK/dV key block),
adds one tile's worth per program (prologue and epilogue), and runs the list-scheduling model
(``list_schedule_makespan``) on ``sms x ctas_per_sm`` slots for the natural and the heaviest-first order.
The ratio of the two makespans is the modelled speed-up; ``ideal`` is the total work over the slots. It
is a model, not a timing: it assumes every tile costs the same and ignores memory effects. The GPU run's
``bench breakdown`` measures the two orders side by side (backends ``triton`` and ``triton-natural``).

    python -m bench launch-order [--sms 132] [--out results/kernels]
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.workloads import benchmark_layout
from kernels.work_order import key_block_work, list_schedule_makespan, query_block_work

# (label, seq_len, heads, tokens per batch): the GPU sweep's shape (16 heads, 32768 tokens per batch)
# and single rows of 8 heads, where there are few programs per SM.
SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("sweep", 8192, 16, 32768),
    ("one row", 8192, 8, 8192),
    ("one row", 2048, 8, 2048),
    ("one row", 32768, 8, 32768),
)
KERNELS = ("fwd", "dkdv", "dq")


def default_blocks(kernel: str) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the kernel's default (first) bf16, D = 128 candidate config."""
    import importlib

    ia = importlib.import_module("kernels.interval_attention")
    bm, bn, *_ = ia._GPU_CANDIDATES[kernel][("half", 128)][0]
    return bm, bn


def model_rows(sms: int = 132, ctas_per_sm: int = 1) -> list[dict]:
    from kernels.interval_attention import key_major_table

    rows = []
    for label, seq_len, heads, tokens in SHAPES:
        batch = max(1, tokens // seq_len)
        layout = benchmark_layout(batch, seq_len, 256, 0.5)
        lo, hi = layout.lo.to(torch.int32), layout.hi.to(torch.int32)
        table = key_major_table(lo, hi, seq_len)
        for kernel in KERNELS:
            bm, bn = default_blocks(kernel)
            if kernel == "dkdv":  # a key block's work in query chunks; a tile is bm / 16 of them
                work, tile = key_block_work(table, seq_len, seq_len, bn), bm / 16
            else:  # a query block's work in keys; a tile is bn of them
                work, tile = query_block_work(lo, hi, seq_len, bm), bn
            per_row = (work.double() / tile).tolist()  # (batch, blocks)
            natural = [w for row in per_row for _ in range(heads) for w in row]  # blocks, then heads, rows
            heaviest = sorted(natural, reverse=True)
            slots = sms * ctas_per_sm
            ideal = (sum(natural) + len(natural)) / slots
            t_nat = list_schedule_makespan(natural, slots)
            t_lpt = list_schedule_makespan(heaviest, slots)
            rows.append(
                dict(
                    shape=label, seq_len=seq_len, heads=heads, batch=batch, kernel=kernel, block_m=bm,
                    block_n=bn, programs=len(natural), slots=slots, natural_over_ideal=t_nat / ideal,
                    heaviest_first_over_ideal=t_lpt / ideal, modelled_speedup=t_nat / t_lpt,
                )
            )  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| shape | L | heads | batch | kernel | blocks | programs | natural / ideal | heaviest first / ideal "
        "| modelled speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['seq_len']} | {r['heads']} | {r['batch']} | {r['kernel']} | "
            f"{r['block_m']}x{r['block_n']} | {r['programs']} | {r['natural_over_ideal']:.3f} | "
            f"{r['heaviest_first_over_ideal']:.3f} | {r['modelled_speedup']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run(out_dir: Path, sms: int = 132, ctas_per_sm: int = 1) -> list[dict]:
    import pandas as pd

    from transfusion.provenance import atomic_write_json, atomic_write_text, provenance

    rows = model_rows(sms, ctas_per_sm)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "launch_order_model.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_json(
        out_dir / "launch_order_model_provenance.json", provenance("cpu", sms=sms, ctas_per_sm=ctas_per_sm)
    )
    header = (
        f"# Launch order: modelled makespan on {sms} SMs x {ctas_per_sm} resident programs\n\n"
        "A list-scheduling model (`python -m bench launch-order`), not a timing: every tile costs the same, "
        "one tile's worth of overhead per program, images of 256 tokens, half the tokens in images, "
        "documents of 2048 tokens.\n\n"
    )
    atomic_write_text(out_dir / "launch_order_model.md", header + markdown_table(rows))
    return rows
