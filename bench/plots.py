"""Plots of the attention sweep, made only from the CSV and provenance files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from transfusion.provenance import atomic_savefig

MODES = {"fwd": "forward", "fwd_bwd": "forward + backward"}


def _base(df: pd.DataFrame) -> pd.DataFrame:
    """Rows on the base grid (first head dim / dtype / image setting of the profile), measured ok."""
    ok = df[df.status == "ok"]
    first = df.iloc[0]
    sel = (
        (ok.head_dim == first.head_dim)
        & (ok["dtype"] == first["dtype"])
        & (ok.image_tokens == first.image_tokens)
    )
    return ok[sel & (ok.image_fraction == first.image_fraction)]


def drop_invalid(base: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """The rows without the Triton timings that cannot stand (bench.summary.invalid_triton_modes: a
    config bench kernel-check found wrong, or a failed check of the autotuned configs)."""
    from bench.summary import invalid_triton_modes

    if not len(base):
        return base
    first = base.iloc[0]
    for seq_len in base.seq_len.unique():
        for mode in invalid_triton_modes(results_dir, int(first.head_dim), str(first["dtype"]), int(seq_len)):
            base = base[~((base.backend == "triton") & (base["mode"] == mode) & (base.seq_len == seq_len))]
    return base


def _title(df: pd.DataFrame, meta: dict) -> str:
    f = df.iloc[0]
    return (
        f"{meta.get('device', '?')}: D={f.head_dim}, {f['dtype']}, {f.heads} heads, "
        f"images of {f.image_tokens} tokens, {f.image_fraction:.0%} image tokens"
    )


def plot_attention(results_dir: Path) -> list[Path]:
    df = pd.read_csv(results_dir / "attention.csv")
    meta = json.loads((results_dir / "attention_provenance.json").read_text())
    plots = results_dir / "plots"
    plots.mkdir(exist_ok=True)
    base = drop_invalid(_base(df), results_dir)
    made = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (mode, label) in zip(axes, MODES.items()):
        for backend, g in base[base["mode"] == mode].groupby("backend"):
            g = g.sort_values("seq_len")
            style = "--" if backend == "causal-sdpa" else "-"
            ax.plot(g.seq_len, g.tflops, style, marker="o", label=backend)
        peak = meta.get("matmul_peak_tflops", {}).get(base.iloc[0]["dtype"] if len(base) else "", None)
        if peak:
            ax.axhline(peak, color="grey", lw=1, ls=":", label=f"matmul peak {peak:.0f}")
        ax.set(xscale="log", xlabel="sequence length", title=label)
        ax.set_xticks(sorted(base.seq_len.unique()), [str(x) for x in sorted(base.seq_len.unique())])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s on allowed pairs")
    axes[1].legend(fontsize=8)
    fig.suptitle(_title(df, meta), fontsize=9)
    fig.tight_layout()
    made.append(plots / "attention_tflops.png")
    atomic_savefig(fig, made[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    unplotted = []  # a log scale cannot show a peak of zero (or none measured): say which points are left out
    for backend, g in base[base["mode"] == "fwd_bwd"].groupby("backend"):
        g = g.sort_values("seq_len")
        shown = g.peak_mem_mb > 0
        unplotted += [f"{backend} L={L}" for L in g.seq_len[~shown]]
        if shown.any():
            ax.plot(g.seq_len[shown], g.peak_mem_mb[shown], marker="o", label=backend)
    xlabel = "sequence length"
    if unplotted:
        note = "not shown (no positive peak memory): " + ", ".join(unplotted[:8])
        note += f" and {len(unplotted) - 8} more" if len(unplotted) > 8 else ""
        xlabel += "\n" + textwrap.fill(note, 100)
    ax.set(xscale="log", ylabel="peak memory (MiB), fwd+bwd")
    ax.set_xlabel(xlabel, fontsize=7 if unplotted else None)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(_title(df, meta), fontsize=7)
    fig.tight_layout()
    made.append(plots / "attention_memory.png")
    atomic_savefig(fig, made[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (mode, label) in zip(axes, MODES.items()):
        sub = base[base["mode"] == mode]
        ref_name = "naive" if "naive" in set(sub.backend) else "sdpa"
        ref = sub[sub.backend == ref_name].set_index("seq_len").ms
        for backend, g in sub.groupby("backend"):
            g = g.set_index("seq_len").sort_index()
            common = g.index.intersection(ref.index)
            if len(common):
                ax.plot(common, ref[common] / g.ms[common], marker="o", label=backend)
        ax.set(
            xscale="log", yscale="log", xlabel="sequence length", title=f"{label}: speedup over {ref_name}"
        )
        ax.grid(alpha=0.3)
        if not len(ref):  # neither naive nor sdpa ran (a sweep of a few backends): say so on the axes
            ax.text(0.5, 0.5, "no naive or sdpa timing to compare with", ha="center", transform=ax.transAxes)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.suptitle(_title(df, meta), fontsize=9)
    fig.tight_layout()
    made.append(plots / "attention_speedup.png")
    atomic_savefig(fig, made[-1], dpi=110)
    plt.close(fig)
    return made
