"""The quick profile's compute curves and parity FLOP ratios (paper Table 3, at toy scale).

Training keeps ``QuickConfig.curve_points`` checkpoints per family. At each one this stage repeats the
evaluation's four metrics, the analogues of the paper's Table 3 columns: bits per byte of held-out
captions (perplexity), captioning accuracy of greedy captions (CIDEr), text-to-image alignment by the
shapes judge (CLIP score) and FID in the suite's feature space (FID). Prompts, sampler and seed are the
evaluation's, so the last point reproduces the final evaluation. The training FLOPs come from the run's
``metrics.jsonl``. The parity FLOP ratio of a metric is the share of the discrete baseline's training
FLOPs at which Transfusion's curve reaches the baseline's final value (``transfusion.eval.parity``); a
curve that never crosses gives a bound (``> r`` or ``<= r``).

Results are cached in ``eval/<family>_curve.json`` under a fingerprint of the run and the settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from transfusion.provenance import atomic_savefig

# metric -> lower is better
CURVE_METRICS: dict[str, bool] = {
    "text_bpb": True,
    "caption_accuracy": False,
    "t2i_alignment": False,
    "fid": True,
}
_LABELS = {
    "text_bpb": "held-out text, bits per byte (lower is better)",
    "caption_accuracy": "captioning accuracy, judge (higher is better)",
    "t2i_alignment": "text-to-image alignment, judge (higher is better)",
    "fid": "FID, shapes-CNN features (lower is better)",
}


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the model checkpoints kept in a run directory, ascending."""
    names = (run_dir / "checkpoints").glob("step_*.safetensors")
    return sorted(int(p.stem.removeprefix("step_")) for p in names)


def flops_at(run_dir: Path, steps: list[int]) -> dict[int, float]:
    """Cumulative training FLOPs at each of ``steps``: the logged value where the step was logged, else
    read off the straight line between the nearest logged steps (FLOPs per step are constant for fixed
    row shapes)."""
    import numpy as np

    from transfusion.train import read_metrics

    logged = sorted(
        (int(r["step"]), float(r["train_flops"])) for r in read_metrics(run_dir / "metrics.jsonl")
    )
    if not logged:
        raise ValueError(f"{run_dir}/metrics.jsonl has no train_flops")
    xs, ys = zip(*logged)
    return {s: float(np.interp(s, xs, ys)) for s in steps}


def curve_family(cfg, family: str, run_dir: Path, eval_dir: Path, fresh: bool) -> dict[str, Any]:
    """The four evaluation metrics at every kept checkpoint of one family's run."""
    from bench.quick import (
        _caption_images,
        _fingerprint,
        _generate_images,
        _load,
        _log,
        _test_items,
        eval_settings,
        image_noise_settings,
        stored_run_fingerprint,
        weights_digests,
    )
    from transfusion.eval import (
        bits_per_byte_of_texts,
        caption_accuracy,
        model_logits_fn,
        text_to_image_alignment,
    )
    from transfusion.provenance import atomic_write_json

    steps = checkpoint_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir}: no checkpoints (did the train stage fail?)")
    flops = flops_at(run_dir, steps)
    fp = _fingerprint(
        {
            "run": stored_run_fingerprint(run_dir),
            "steps": steps,
            "eval": eval_settings(cfg),
            "weights": weights_digests(cfg, run_dir, steps),
            **image_noise_settings(cfg, family),
        }
    )
    out_json = eval_dir / f"{family}_curve.json"
    if not fresh and out_json.is_file():
        stored = json.loads(out_json.read_text())
        if stored.get("fingerprint") == fp:
            _log(f"{family}: reusing the compute curve in {out_json}")
            return {**stored, "_reused": True}

    items = _test_items(cfg, max(cfg.n_t2i, cfg.n_caption, cfg.n_text))
    prompts = [it["caption"] for it in items[: cfg.n_t2i]]
    truth = torch.stack([it["image"] for it in items[: cfg.n_t2i]])
    texts = [it["caption"] for it in items[: cfg.n_text]]
    cap_items = items[: cfg.n_caption]
    cap_images = torch.stack([it["image"] for it in cap_items])
    points = []
    for step in steps:
        torch.manual_seed(cfg.sampling_seed)  # as the evaluation: the same noise for the same prompts
        lm = _load(family, run_dir, step)
        with torch.no_grad():
            images = _generate_images(cfg, family, lm, prompts)
            bpb = bits_per_byte_of_texts(model_logits_fn(lm.model), lm.tokenizer, texts)
            captions = _caption_images(cfg, family, lm, cap_images)
        points.append(
            {
                "step": step,
                "train_flops": flops[step],
                "text_bpb": bpb.bits_per_byte,
                "caption_accuracy": caption_accuracy(captions, [it["objects"] for it in cap_items]).score,
                "t2i_alignment": text_to_image_alignment(images, prompts).score,
                "fid": _fid(cfg, truth, images),
            }
        )
    result = {"fingerprint": fp, "family": family, "points": points}
    eval_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_json, result)
    return result


def _fid(cfg, real: torch.Tensor, generated: torch.Tensor) -> float | None:
    """FID of generated against real images in the suite's feature space (None if it cannot be had: the
    other metrics stand on their own and the curve shows a gap)."""
    if not cfg.fid:
        return None
    from bench.quick import fid_against

    try:
        out = fid_against(cfg, real, generated)
    except Exception:
        return None
    return float(out["fid"])


def metric_parity(points: list[dict], final: dict, metric: str, lower_is_better: bool) -> dict | None:
    """Where the curve ``points`` (dicts with ``train_flops`` and ``metric``) first reaches ``final``'s value
    of ``metric``, as a share of ``final``'s training FLOPs; None when either side lacks the metric."""
    from transfusion.eval.parity import parity_flop_ratio

    pts = [p for p in points if p.get(metric) is not None]
    if not pts or final.get(metric) is None:
        return None
    parity = parity_flop_ratio(
        [p["train_flops"] for p in pts],
        [p[metric] for p in pts],
        target=final[metric],
        baseline_flops=final["train_flops"],
        lower_is_better=lower_is_better,
    )
    return {**parity.as_dict(), "display": str(parity)}


def parity_ratios(curves: dict[str, dict | None]) -> dict[str, dict | None]:
    """Per metric: where Transfusion's curve reaches the discrete baseline's final value, as a share of
    the baseline's training FLOPs (None when either curve is missing)."""
    tf, base = curves.get("transfusion") or {}, curves.get("discrete") or {}
    final = (base.get("points") or [{}])[-1]
    return {m: metric_parity(tf.get("points", []), final, m, lower) for m, lower in CURVE_METRICS.items()}


def plot_curves(
    out_dir: Path,
    curves: dict[str, dict | None],
    parity: dict[str, dict | None],
    chance: dict[str, float] | None = None,
) -> Path:
    """``plots/metrics_vs_flops.png``: each metric against training FLOPs, both families, with the
    baseline's final value, the parity point and (``chance``, per metric) the chance level marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    final = (((curves.get("discrete") or {}).get("points")) or [{}])[-1]
    for ax, metric in zip(axes.flat, CURVE_METRICS):
        for fam, curve in curves.items():
            pts = [p for p in (curve or {}).get("points", []) if p.get(metric) is not None]
            if pts:
                ax.plot([p["train_flops"] for p in pts], [p[metric] for p in pts], marker="o", label=fam)
        if final.get(metric) is not None:
            ax.axhline(final[metric], color="gray", ls=":", lw=1, label="baseline final")
        if chance and chance.get(metric) is not None:
            ax.axhline(chance[metric], color="red", ls="-.", lw=1, label="chance (shuffled pairs)")
        par = parity.get(metric)
        if par:
            ax.axvline(
                par["flops"], color="black", ls="--", lw=1, label=f"parity FLOP ratio {par['display']}"
            )
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_title(_LABELS[metric], fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "plots" / "metrics_vs_flops.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path
