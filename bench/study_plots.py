"""Plots of the study profile: one figure per ablation group (mean over seeds with its spread; dots: each
seed) and, for the size ladders, metric against training FLOPs with one line per family or adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.study_grid import GROUP_TITLES
from transfusion.provenance import atomic_savefig

_LABELS = {
    "text_bpb": "bits per byte (lower is better)",
    "caption_accuracy": "caption accuracy",
    "t2i_alignment": "text-to-image alignment",
    "fid": "FID, shapes CNN (lower is better)",
    "latent_std_ratio": "generated / real latent std (1 = data's scale)",
    "caption_empty": "share of empty captions",
}
# one more panel for the groups it concerns: how far the sampler's latents drift from the data's scale,
# and the share of captions ended at once
EXTRA_PANELS: dict[str, str] = {
    **dict.fromkeys(
        (
            "scaling",
            "scaling_x0_clip",
            "scaling_ddim_clip3",
            "scaling_val_samplers",
            "scaling_lr_3e-4",
            "scaling_lr_3e-3",
            "scaling_lr_1e-2",
            "inference_steps",
            "x0_clip",
            "sampler_clip",
            "loss_weighting",
            "cfg_scale",
        ),
        "latent_std_ratio",
    ),
    **dict.fromkeys(("cfg_dropout", "dropped_caption_loss"), "caption_empty"),
}
_CHANCE = {"caption_accuracy": "shuffled_caption_accuracy", "t2i_alignment": "shuffled_t2i_alignment"}


def _chance_line(ax, metric: str, references: dict[str, Any] | None) -> None:
    value = (references or {}).get(_CHANCE.get(metric, ""))
    if isinstance(value, (int, float)):
        ax.axhline(value, color="grey", ls="--", lw=1, label="chance (shuffled pairs)")
        ax.legend(fontsize=7, loc="best")


def plot_study(
    out: Path,
    summary: list[dict[str, Any]],
    lines: list[dict[str, Any]],
    references: dict[str, Any] | None = None,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.quick_curves import CURVE_METRICS

    plots = Path(out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    groups = list(dict.fromkeys(s["group"] for s in summary))
    for group in groups:
        rows = [s for s in summary if s["group"] == group]
        metrics = list(CURVE_METRICS)
        extra = EXTRA_PANELS.get(group)
        if extra and any(r.get(f"{extra}_mean") is not None for r in rows):
            metrics.append(extra)
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            if any(r["series"] for r in rows):
                _ladder_panel(ax, metric, rows, lines)
            else:
                _bar_panel(ax, metric, rows, lines)
            _chance_line(ax, metric, references)
            if metric == "latent_std_ratio":
                ax.axhline(1.0, color="grey", ls="--", lw=1)
            ax.set_title(_LABELS[metric], fontsize=9)
            ax.grid(alpha=0.3)
        seeds = sorted({ln["seed"] for ln in lines})
        fig.suptitle(f"{GROUP_TITLES.get(group, group)}  (seeds {', '.join(map(str, seeds))})", fontsize=10)
        fig.tight_layout()
        path = plots / f"study_{group}.png"
        atomic_savefig(fig, path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _bar_panel(ax, metric: str, rows: list[dict[str, Any]], lines: list[dict[str, Any]]) -> None:
    xs = range(len(rows))
    means = [r[f"{metric}_mean"] if r[f"{metric}_mean"] is not None else float("nan") for r in rows]
    errs = [r[f"{metric}_std"] or 0.0 for r in rows]
    # points, not bars: the axis zooms onto the differences instead of starting at zero
    ax.errorbar(xs, means, yerr=errs, fmt="o", color="tab:blue", ms=7, capsize=4, label="mean +- std")
    for x, r in zip(xs, rows):
        ys = [ln[metric] for ln in lines if ln["group"] == r["group"] and ln["label"] == r["label"]]
        ys = [y for y in ys if y is not None]
        ax.plot([x] * len(ys), ys, "k.", ms=4)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["label"] for r in rows], rotation=30, ha="right", fontsize=7)


def _ladder_panel(ax, metric: str, rows: list[dict[str, Any]], lines: list[dict[str, Any]]) -> None:
    """One line per series (family or adapter) through its sizes' means; dots: each seed."""
    from matplotlib.ticker import NullFormatter

    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for series, color in zip(dict.fromkeys(r["series"] for r in rows), colors):
        mine = sorted(
            (
                r
                for r in rows
                if r["series"] == series and r["train_flops_mean"] and r[f"{metric}_mean"] is not None
            ),
            key=lambda r: r["train_flops_mean"],
        )
        if not mine:
            continue
        ax.plot([r["train_flops_mean"] for r in mine], [r[f"{metric}_mean"] for r in mine], "-o", color=color,
                label=series)  # fmt: skip
        keys = {(r["group"], r["label"]) for r in mine}
        pts = [
            ln
            for ln in lines
            if (ln["group"], ln["label"]) in keys and ln[metric] is not None and ln["train_flops"]
        ]
        ax.plot([ln["train_flops"] for ln in pts], [ln[metric] for ln in pts], ".", color=color, alpha=0.6)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short log axis overlap
    ax.set_xlabel("training FLOPs", fontsize=8)
    ax.legend(fontsize=7)


def plot_eval_noise(out: Path, lines: list[dict[str, Any]]) -> Path:
    """bench.eval_noise's figure: per sampled metric and row, each training seed's scores under every
    evaluation seed (dots, side by side), so the two spreads can be compared by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("fid", "t2i_alignment", "caption_accuracy")  # bits per byte draw no samples
    keys = list(dict.fromkeys((ln["group"], ln["label"]) for ln in lines))  # labels repeat across groups
    one_group = len({g for g, _ in keys}) == 1
    labels = [label if one_group else f"{group}: {label}" for group, label in keys]
    seeds = sorted({ln["seed"] for ln in lines})
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 4.0), squeeze=False)
    width = 0.6 / max(1, len(seeds))
    for ax, metric in zip(axes[0], metrics):
        for i, seed in enumerate(seeds):
            for x, key in enumerate(keys):
                ys = [ln[metric] for ln in lines if (ln["group"], ln["label"]) == key and ln["seed"] == seed]
                ys = [y for y in ys if y is not None]
                xpos = x - 0.3 + width * (i + 0.5)
                ax.plot([xpos] * len(ys), ys, ".", color=colors(i), ms=6,
                        label=f"training seed {seed}" if x == 0 else None)  # fmt: skip
                if ys:
                    ax.plot(
                        [xpos - width / 3, xpos + width / 3], [sum(ys) / len(ys)] * 2, "-", color=colors(i)
                    )
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(_LABELS[metric], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    eval_seeds = sorted({ln["eval_seed"] for ln in lines})
    fig.suptitle(
        f"Evaluation seeds {', '.join(map(str, eval_seeds))} (dots; dash: their mean) per training seed",
        fontsize=10,
    )
    fig.tight_layout()
    plots = Path(out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    path = plots / "eval_noise.png"
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path
