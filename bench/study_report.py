"""The study profile's section of REPORT.md, read from ``study.csv`` and ``study.json`` alone."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bench.flops_recount import parity_list, recounted_parity
from bench.study_grid import GROUP_TITLES, LR_CHOICE, LR_CHOICE_GROUP

_METRICS = (
    ("text_bpb", "bits/byte"),
    ("caption_accuracy", "caption acc"),
    ("caption_empty", "empty caps"),
    ("t2i_alignment", "t2i align"),
    ("fid", "FID"),
    ("kid", "KID"),
    ("latent_std_ratio", "latent std ratio"),
)
_PAPER = (
    ("paper_c4_ppl", "paper C4 ppl"), ("paper_cider", "paper CIDEr"), ("paper_fid", "paper FID"),
    ("paper_clip", "paper CLIP"),
)  # fmt: skip


def _fill_older_columns(df: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Columns a study.csv written before they existed lacks, from what the folder does hold: KID's mean,
    sample std and count over seeds from study_runs.csv (as summarize_rows computes them), the paper's
    figures from the grid's rows."""
    from bench.study_grid import ROWS

    runs_file = folder / "study_runs.csv"
    if "kid_mean" not in df and runs_file.exists():
        runs = pd.read_csv(runs_file)
        if "kid" in runs:
            kid = runs.dropna(subset=["kid"]).groupby(["group", "label"])["kid"]
            stats = pd.DataFrame({"kid_mean": kid.mean(), "kid_std": kid.std(ddof=1), "kid_n": kid.count()})
            df = df.merge(stats, left_on=["group", "label"], right_index=True, how="left")
    paper = {(r.group, r.label): r.paper for r in ROWS}
    for key, _ in _PAPER:
        if key not in df:
            df[key] = [paper.get((g, lab), {}).get(key, math.nan) for g, lab in zip(df["group"], df["label"])]
    return df


def _cell(mean: object, std: object, n: object, n_seeds: object) -> str:
    """mean ± sample std over seeds; (n=k) when fewer seeds than the row's have this metric; "-" when
    the metric is missing (also from a study.csv written before the metric existed)."""
    if not isinstance(mean, float) or math.isnan(mean):
        return "-"
    text = f"{mean:.3g} ± {std:.2g}" if isinstance(std, float) and not math.isnan(std) else f"{mean:.3g}"
    if isinstance(n, (int, float)) and isinstance(n_seeds, (int, float)) and n < n_seeds:
        text += f" (n={int(n)})"
    return text


def _choice_table(
    choices: list[dict],
    columns: list[tuple[str, str]],
    cell: Callable[[dict], str],
    parity: dict | None = None,
) -> list[str]:
    """One markdown row per metric of the learning-rate ``choices``: ``cell(choice)`` in each (family,
    size) column ("-" where that metric has no choice), and with ``parity`` (metric -> reading) a last
    column for the chosen ladder's parity."""
    by_metric: dict[str, dict[tuple[str, str], dict]] = {}
    for c in choices:
        by_metric.setdefault(c["metric"], {})[(c["family"], c["size"])] = c
    names = [f"{f} {z}" for f, z in columns] + (["parity"] if parity is not None else [])
    rows = ["| metric | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for metric, cells in by_metric.items():
        row = [cell(cells[col]) if col in cells else "-" for col in columns]
        if parity is not None:
            row.append(str((parity.get(metric) or {}).get("display", "-")))
        rows.append(f"| {metric} | " + " | ".join(row) + " |")
    return rows


def _lr_choice_lines(choice: dict | None) -> list[str]:
    """The learning rate each family and size took on val, per metric, and the parity of those ladders."""
    if not choice or not choice.get("choices"):
        return []
    choices = choice["choices"]
    columns = list(dict.fromkeys((c["family"], c["size"]) for c in choices))
    return [
        "Chosen on val: per metric, the learning rate whose val mean is best for each family and size. The",
        "test rows at those rates (from the fixed-rate ladders) form one ladder per metric, read for its",
        "parity FLOP ratio like the others.",
        "",
        *_choice_table(choices, columns, lambda c: str(c["lr"]), parity=choice.get("parity") or {}),
        "",
        *_margin_lines(choices, columns),
    ]


def _margin_cell(c: dict) -> str:
    """The chosen rate's paired val lead over the runner-up, "+m ± se, p (vs rate)"; bold where the paired
    t-test gives p < 0.05. Equal val means read "tie" (the first rate listed was taken); a lead the same
    for every seed has no spread to test ("untested")."""
    margin, se, p = c.get("margin"), c.get("margin_se"), c.get("margin_p")
    if not isinstance(margin, (int, float)):
        return "-"
    text = "tie" if margin == 0 else f"{margin:+.3g}"
    if isinstance(se, (int, float)):
        text += f" ± {se:.2g}, p {p:.2g}" if isinstance(p, (int, float)) else f" ± {se:.2g}, untested"
    resolved = isinstance(p, (int, float)) and p < 0.05 and margin > 0
    return (f"**{text}**" if resolved else text) + f" (vs {c.get('runner_up')})"


def _margin_lines(choices: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """How clearly each rate was chosen (a study.json written before the margins has none: no table)."""
    if not any("margin" in c for c in choices):
        return []
    return [
        "How clearly: the chosen rate's val lead over the runner-up, seed by seed (mean ± standard error",
        "over training seeds of the difference between one seed's two models, which share its initial",
        "weights, data order and noise pool; positive favours the chosen rate), and the two-sided p of a",
        "paired t-test. Bold: p < 0.05; the others do not resolve the choice. Every model reads the same",
        "val prompts, so the test holds for those prompts only; and with one test per cell, about one cell",
        "in twenty with no true lead reads bold by chance.",
        "",
        *_choice_table(choices, columns, _margin_cell),
        "",
    ]


def _with_margins(info: dict) -> dict | None:
    """The stored learning-rate choice, with each choice's paired margin over the runner-up. A study.json
    written before the margins existed gets them from its own per-seed runs; a choice that reading does
    not reproduce (the rule changed since) keeps none."""
    choice = info.get("lr_choice")
    if not choice or not info.get("runs") or any("runner_up" in c for c in choice.get("choices", [])):
        return choice
    from bench.study import lr_choice

    seeds = len(info.get("config", {}).get("seeds", [])) or None
    again = lr_choice(info.get("summary") or [], seeds=seeds, lines=info["runs"])["choices"]
    key = ("metric", "family", "size", "lr")
    read = {tuple(c[k] for k in key): c for c in again}
    margins = [
        {k: v for k, v in read.get(tuple(c[k] for k in key), {}).items() if k not in c}
        for c in choice["choices"]
    ]
    return {**choice, "choices": [{**c, **m} for c, m in zip(choice["choices"], margins)]}


def _recount_line(recounted: dict[str, dict], group: str) -> list[str]:
    """The group's parity ratios recounted with attention on allowed pairs (bench flops-recount), if any."""
    if group not in recounted:
        return []
    listed = parity_list(recounted[group])
    return [f"With attention counted on allowed pairs only (`flops_recount.md`): {listed}.", ""]


def study_section(folder: Path) -> list[str]:
    from bench.quick import changed_settings

    df = _fill_older_columns(pd.read_csv(folder / "study.csv"), folder)
    info = json.loads((folder / "study.json").read_text()) if (folder / "study.json").exists() else {}
    seeds = info.get("config", {}).get("seeds", [])
    refs = info.get("references") or {}
    # the steps the trained models actually reached (a finished longer run is reused, not retrained)
    runs = pd.read_csv(folder / "study_runs.csv") if (folder / "study_runs.csv").exists() else None
    reached = sorted({int(x) for x in runs["steps"].dropna()}) if runs is not None else []
    steps = " or ".join(map(str, reached)) or info.get("config", {}).get("quick", {}).get("steps")
    lines = [
        f"## Ablations and scaling at toy scale, study profile ({folder.name})",
        "",
        f"Every row is trained for {steps} steps with the quick recipe (tiny model unless the row names",
        f"a size) for each of the seeds {seeds} and judged with the quick job's metrics; cells are the mean",
        "± the sample standard deviation over seeds. Our columns stand in for the paper's: bits per byte of",
        "held-out captions for C4 perplexity, the judge's caption accuracy for CIDEr, its text-to-image",
        "alignment for the CLIP score, FID in the shapes-CNN feature space for COCO FID (KID, in the same",
        "space, beside it). The paper's figures stand beside the rows they match (0.76B in Tables 5, 6 and",
        "8; in Table 7 the sizes our ladder stands in for); its Tables 5 and 6 were trained without noise",
        "limiting (their U-Net 2x2 row is Table 8's 'off'), ours keep it on except in the noise-limit",
        "group. `empty caps`: the share of",
        "captions ended at once (<EOS> right after the image), each scoring 0; the evaluation's one-token",
        "floor (`caption_min_tokens`, default 1) keeps it at 0 except in the rows marked 'free captions'.",
        "`latent std ratio`: the std of Transfusion's generated latents over that of the prompts' real",
        "latents (1: the data's scale).",
    ]
    if refs.get("shuffled_caption_accuracy") is not None:
        lines += [
            "Chance levels (the judge on shuffled pairs): caption accuracy "
            f"{refs['shuffled_caption_accuracy']:.3g}, alignment {refs['shuffled_t2i_alignment']:.3g}.",
        ]
    recount_file = folder / "flops_recount.json"
    recount = json.loads(recount_file.read_text()) if recount_file.exists() else None
    recounted = recounted_parity(folder)
    if recount:
        lines.append(
            "The train FLOPs columns and the parity ratios count attention as training then did: every"
            " (query, key) pair, as the sdpa backend computes it. The trainer now counts attention on the"
            " mask's allowed pairs only; `python -m bench flops-recount` rebuilt each ladder run's first"
            f" step, reproduced {sum(c['reproduced'] for c in recount['counts'])} of {len(recount['counts'])}"
            " stored counts exactly, and gives the ratios on allowed pairs beside each."
        )
    changed = changed_settings(info.get("config", {}).get("quick"))
    if changed:  # a study run with --set (e.g. more images per evaluation) says so beside its tables
        lines.append(f"Settings changed from the quick defaults for every row: {changed}.")
    lines.append("")
    # the learning-rate choice follows the last of its val groups present (the extra rates' groups may
    # follow the others)
    val_groups = {val_group for val_group, _ in LR_CHOICE.values()}
    choice_after = next((g for g in reversed(df["group"].unique()) if g in val_groups), LR_CHOICE_GROUP)
    for group, rows in df.groupby("group", sort=False):
        paper_cols = [(k, name) for k, name in _PAPER if rows[k].notna().any()]
        cols = ["row", "seeds", *(name for _, name in _METRICS), *(name for _, name in paper_cols)]
        ladder = rows["series"].notna().any()
        if ladder:
            cols.insert(2, "train FLOPs")
        table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in rows.iterrows():
            cells = [str(r["label"]), str(r["n_seeds"])]
            if ladder:
                cells.append(f"{r['train_flops_mean']:.3g}")
            cells += [
                _cell(r.get(f"{m}_mean"), r.get(f"{m}_std"), r.get(f"{m}_n"), r["n_seeds"])
                for m, _ in _METRICS
            ]
            cells += [f"{r[k]:.3g}" if not math.isnan(r[k]) else "-" for k, _ in paper_cols]
            table.append("| " + " | ".join(cells) + " |")
        lines += [f"### {GROUP_TITLES.get(group, group)}", "", *table, ""]
        if group == choice_after:
            lines += _lr_choice_lines(_with_margins(info))
            lines += _recount_line(recounted, LR_CHOICE_GROUP)
        elif group in val_groups:
            pass  # its parity is the choice's, printed with the choice table
        elif (info.get("parity") or {}).get(group):
            parts = [f"{m}: {p['display']}" for m, p in info["parity"][group].items() if p]
            if parts:
                lines += [
                    "Parity FLOP ratios read across the sizes (the share of the largest discrete model's",
                    "training FLOPs at which Transfusion's size curve reaches its final value; `>`: never",
                    "within the ladder, `<=`: already at the smallest size): " + "; ".join(parts) + ".",
                    "",
                ]
                lines += _recount_line(recounted, group)
        png = folder / "plots" / f"study_{group}.png"
        if png.exists():
            lines += [f"![study_{group}]({folder.name}/plots/{png.name})", ""]
    return lines
