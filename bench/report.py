"""Build results/REPORT.md from the result files alone (never from memory or hand-typed numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.flops_recount import parity_list, recounted_parity
from bench.plots import plot_attention
from bench.study_report import study_section
from bench.summary import summarize
from transfusion.provenance import atomic_write_text

QUICK_COLUMNS = [
    "family", "status", "steps", "train_flops", "final_loss", "final_text_loss", "t2i_alignment",
    "caption_accuracy", "caption_empty", "text_bpb", "recon_alignment", "fid", "recon_fid",
    "latent_std_ratio", "ae_psnr",
    "parity_text_bpb", "parity_caption_accuracy", "parity_t2i_alignment", "parity_fid",
]  # fmt: skip


def _csv_table(path: Path, columns: list[str]) -> str:
    """A markdown table of ``columns``; a column the file lacks (written by an older version) shows "-"."""
    df = pd.read_csv(path).reindex(columns=columns)

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.3g}"  # NaN: missing
        return str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.values]
    return "\n".join([head, *rows])


def _quick_settings(folder: Path) -> list[str]:
    """A line naming the quick config fields this run changed from the defaults, if any (none when the
    folder has no readable quick.json)."""
    from bench.quick import changed_settings

    try:
        config = json.loads((folder / "quick.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return []
    changed = changed_settings(config)
    return [f"Settings changed from the quick defaults: {changed}.", ""] if changed else []


# The paper's parity FLOP ratios (Table 3, 7B) for the metrics ours stand in for: C4 perplexity (bits
# per byte), CIDEr (caption accuracy), CLIP score (text-to-image alignment), COCO FID.
PAPER_PARITY = {"text_bpb": 0.489, "caption_accuracy": 0.218, "t2i_alignment": 0.319, "fid": 0.029}
_PARITY_COLUMNS = (
    ("text_bpb", "bits per byte"), ("caption_accuracy", "captioning"), ("t2i_alignment", "alignment"),
    ("fid", "FID"),
)  # fmt: skip


def _parity_cells(parity: dict) -> str:
    return " | ".join(str((parity.get(m) or {}).get("display", "-")) for m, _ in _PARITY_COLUMNS)


def headline_section(results_root: Path) -> list[str]:
    """Every parity FLOP ratio the results hold, one row per comparison (the quick jobs' checkpoint
    curves, the study's family ladders), beside the paper's: the answer to "does Transfusion beat the
    discrete baseline at equal training FLOPs", read off the files."""
    from bench.quick import changed_settings

    rows = []
    for folder in sorted(p for p in results_root.iterdir() if p.is_dir()):
        if (folder / "quick.json").exists():
            info = json.loads((folder / "quick.json").read_text())
            changed = changed_settings(info.get("config"))
            recounted = recounted_parity(folder).get("quick")
            what = f"quick job, checkpoint curves ({folder.name}{'; ' + changed if changed else ''})"
            what += ", recounted" if recounted else ""
            rows.append(f"| {what} | {_parity_cells(recounted or info.get('parity') or {})} |")
        if (folder / "study.json").exists():
            from bench.study_grid import FAMILY_LADDERS, GROUP_TITLES

            info = json.loads((folder / "study.json").read_text())
            recounted = recounted_parity(folder)
            parities = {**(info.get("parity") or {}), **recounted}
            # the folder and seed count tell apart two studies that share a group (a rerun with more seeds)
            seeds = len(info.get("config", {}).get("seeds", []))
            run = f"{folder.name}, {seeds} seed{'s' * (seeds != 1)}" if seeds else folder.name
            changed = changed_settings(info.get("config", {}).get("quick"))  # e.g. a study's --set n_t2i
            run += f"; {changed}" if changed else ""
            order = [g for g in FAMILY_LADDERS if g in parities] + sorted(set(parities) - set(FAMILY_LADDERS))
            for group in order:
                title = GROUP_TITLES.get(group, group)
                cells = _parity_cells(parities[group] or {})
                mark = ", recounted" if group in recounted else ""
                rows.append(f"| study ladder `{group}` ({run}{mark}): {title} | {cells} |")
    if not rows:
        return []
    paper = " | ".join(f"{PAPER_PARITY[m]:g}" for m, _ in _PARITY_COLUMNS)
    return [
        "## Headlines: parity FLOP ratios",
        "",
        "The share of the discrete baseline's training FLOPs at which Transfusion reaches the baseline's",
        "final value (lower favours Transfusion; `> r`: never within the run or ladder, `<= r`: already at",
        "its first point). The sections below have the curves, the caveats and the notes. Attention",
        "FLOPs count the mask's allowed pairs only; `recounted` rows were trained when training counted",
        "every pair, and show `python -m bench flops-recount`'s ratios (the sections keep both).",
        "",
        "| comparison | " + " | ".join(name for _, name in _PARITY_COLUMNS) + " |",
        "|---|" + "---|" * len(_PARITY_COLUMNS),
        f"| paper, Table 3 (7B; C4, CIDEr, CLIP, FID) | {paper} |",
        *rows,
        "",
    ]


def build_report(results_root: Path = Path("results")) -> Path:
    sections = [
        "# Transfusion bench report",
        "",
        "Built by `python -m bench report` from the files under `results/`; every table below is read from",
        "a CSV written by the suite, and each folder's provenance file names the commit, device, versions,",
        "command and seed that produced it.",
        "",
        *headline_section(results_root),
    ]
    for folder in sorted(p for p in results_root.iterdir() if p.is_dir()):
        if (folder / "quick.csv").exists():
            sections += [
                f"## Transfusion vs the discrete baseline, quick profile ({folder.name})",
                "",
                "Tiny models on the procedural shapes data; alignment and caption accuracy are the shapes",
                "judge's attribute accuracy (`recon_alignment`: the judge on the autoencoder's",
                "reconstructions of real test images, the ceiling either family can reach through it).",
                "`fid`: FID of the generated images against the prompts' real images in the suite's",
                "shapes-CNN feature space (`recon_fid`: the same for the autoencoder's reconstructions).",
                "`caption_empty`: the share of captions ended at once (<EOS> right after the image).",
                "`latent_std_ratio`: the std of Transfusion's generated latents over that of the prompts'",
                "real images' latents (1: the data's scale; well above 1: the sampler drove them off it).",
                "",
                *_quick_settings(folder),
                _csv_table(folder / "quick.csv", QUICK_COLUMNS),
                "",
            ]
            sections += [
                "`parity_*`: the share of the discrete baseline's training FLOPs at which Transfusion's",
                "checkpoint curve reaches the baseline's final value (paper Table 3; `> r`: never within the",
                "run, `<= r`: already at the first checkpoint).",
                "",
            ]
            recounted = recounted_parity(folder).get("quick")
            if recounted:
                sections += [
                    "These ratios count attention as training then did (every pair); recounted on the",
                    f"mask's allowed pairs (`flops_recount.md`): {parity_list(recounted)}.",
                    "",
                ]
            pngs = (
                "loss_vs_flops",
                "metrics_vs_flops",
                "judge_accuracy",
                "samples_transfusion",
                "samples_discrete",
            )
            for png in pngs:
                if (folder / "plots" / f"{png}.png").exists():
                    sections.append(f"![{png}]({folder.name}/plots/{png}.png)")
            sections.append("")
        if (folder / "study.csv").exists():
            sections += study_section(folder)
        if (folder / "eval_noise_summary.csv").exists():
            sections += [
                f"## Evaluation noise ({folder.name})",
                "",
                "Study rows evaluated again under several evaluation seeds (`python -m bench eval_noise`),",
                "every training seed under every evaluation seed (a crossed design). `sampling_std`: the",
                "spread over evaluation seeds with the weights fixed (pooled over the training seeds);",
                "`seed_std`: the spread over training seeds of their means over evaluation seeds;",
                "`training_std`: the training seed's own spread (two-way random effects: `seed_std` less",
                "the interaction's share); `pool_std`: the evaluation seed's effect shared by every training",
                "seed of the row. Bits per byte draw no samples and captions are greedy: their sampling",
                "spreads are 0.",
                "",
                _csv_table(
                    folder / "eval_noise_summary.csv",
                    [
                        "group",
                        "label",
                        "metric",
                        "n_seeds",
                        "n_eval_seeds",
                        "mean",
                        "sampling_std",
                        "seed_std",
                        "training_std",
                        "pool_std",
                    ],
                ),
                "",
                f"![eval_noise]({folder.name}/plots/eval_noise.png)",
                "",
            ]
        if (folder / "attention.csv").exists():
            plot_attention(folder)
            summary = summarize(folder).replace("# Attention", f"## Attention ({folder.name})", 1)
            sections += [summary, ""]
            for png in ("attention_tflops", "attention_speedup", "attention_memory"):
                sections.append(f"![{png}]({folder.name}/plots/{png}.png)")
        if (folder / "generation.csv").exists():
            sections += [
                f"## Text-to-image with and without prefix KV reuse ({folder.name})",
                "",
                _csv_table(
                    folder / "generation.csv",
                    ["prefix_tokens", "image_tokens", "num_steps", "cached_s", "recompute_s", "speedup"],
                ),
                "",
            ]
        if (folder / "kernel_resources.md").exists():
            text = (folder / "kernel_resources.md").read_text()
            sections += [text.replace("# Triton kernel", f"## Triton kernel ({folder.name}):", 1), ""]
        if (folder / "launch_order_model.md").exists():
            text = (folder / "launch_order_model.md").read_text()
            title = f"## Triton kernel ({folder.name}): launch order"
            sections += [text.replace("# Launch order", title, 1), ""]
        if any(
            (folder / f).exists()
            for f in (
                "attention.csv",
                "generation.csv",
                "quick.csv",
                "kernel_resources.md",
                "study.csv",
                "eval_noise_summary.csv",
            )
        ):
            notes = folder / "NOTES.md"
            if notes.exists():
                sections += ["", f"Notes on this run: [{folder.name}/NOTES.md]({folder.name}/NOTES.md).", ""]
    out = results_root / "REPORT.md"
    atomic_write_text(out, "\n".join(sections) + "\n")
    return out
