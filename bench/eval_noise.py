"""Evaluation noise: how much of a study row's spread over training seeds is the evaluation's sampling.

    python -m bench eval_noise [--groups lr_choice_val] [--seeds 0,1,2] [--eval-seeds 1000,2000,3000]

Every (training, seed) of the groups' rows is taken from the study's runs (trained first if missing)
and evaluated again under each evaluation seed (``QuickConfig.eval_seed``: the images' sampling noise
and the KID subsets; the prompts, images and texts stay the split's first items). Per row and metric,
two spreads are then set side by side:

- ``sampling_std``: the spread over evaluation seeds with the weights fixed, pooled over the training
  seeds (the root of the mean within-training variance);
- ``seed_std``: the spread over training seeds of each training's mean over evaluation seeds.

With n evaluation seeds, a one-way random-effects reading estimates the training seed's own spread as
``training_std = sqrt(max(0, seed_std**2 - sampling_std**2 / n))``. Bits per byte draw no samples and
captions are decoded greedily, so their ``sampling_std`` is 0: a check that only the sampling moved.

Writes OUT/eval_noise.csv (a line per row, training seed and evaluation seed), OUT/eval_noise_summary.csv,
OUT/eval_noise.json, OUT/eval_noise_provenance.json and OUT/plots/eval_noise.png. The evaluations live
beside the study's in the run folders (``eval/...-eval_seed=K``) and are reused on reruns.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.quick import QuickConfig, parse_set_options, to_csv
from bench.quick_curves import CURVE_METRICS
from bench.study import RUN_FIELDS, StudyConfig, execute, plan_jobs, run_rows
from bench.study_grid import GROUPS, rows_for
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance

DEFAULT_GROUPS: tuple[str, ...] = ("lr_choice_val",)
# far apart: Transfusion's image rows are seeded eval_seed + i (check_eval_seeds)
DEFAULT_EVAL_SEEDS: tuple[int, ...] = (1000, 2000, 3000)
SUMMARY_FIELDS: tuple[str, ...] = (
    "group", "label", "training", "metric", "n_seeds", "n_eval_seeds", "mean", "sampling_std", "seed_std",
    "training_std",
)  # fmt: skip


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals)


def _var(vals: list[float]) -> float:
    m = _mean(vals)
    return sum((v - m) ** 2 for v in vals) / (len(vals) - 1)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize_noise(
    lines: list[dict[str, Any]], metrics: tuple[str, ...] = CURVE_METRICS
) -> list[dict[str, Any]]:
    """Per row and metric: the mean, the pooled spread over evaluation seeds, the spread over training
    seeds of the per-training means, and the training seed's own spread estimated from both. A training
    seed counts only when every evaluation seed scored it (a balanced design)."""
    eval_seeds = sorted({ln["eval_seed"] for ln in lines})
    out = []
    for key in dict.fromkeys((ln["group"], ln["label"], ln["training"]) for ln in lines):
        mine = [ln for ln in lines if (ln["group"], ln["label"], ln["training"]) == key]
        for metric in metrics:
            by_seed: dict[int, list[float]] = {}
            for ln in mine:
                if _number(ln.get(metric)):
                    by_seed.setdefault(ln["seed"], []).append(float(ln[metric]))
            full = [v for v in by_seed.values() if len(v) == len(eval_seeds)]
            row: dict[str, Any] = dict(zip(("group", "label", "training"), key))
            row.update(metric=metric, n_seeds=len(full), n_eval_seeds=len(eval_seeds), mean=None,
                       sampling_std=None, seed_std=None, training_std=None)  # fmt: skip
            if full:
                row["mean"] = _mean([v for vals in full for v in vals])
            if full and len(eval_seeds) > 1:
                row["sampling_std"] = math.sqrt(_mean([_var(vals) for vals in full]))
            if len(full) > 1:
                row["seed_std"] = math.sqrt(_var([_mean(vals) for vals in full]))
            if row["sampling_std"] is not None and row["seed_std"] is not None:
                excess = row["seed_std"] ** 2 - row["sampling_std"] ** 2 / len(eval_seeds)
                row["training_std"] = math.sqrt(max(0.0, excess))
            out.append(row)
    return out


def check_eval_seeds(eval_seeds: tuple[int, ...], base: QuickConfig) -> None:
    """Refuse evaluation seeds that would share sampling noise. Transfusion seeds its n_t2i image rows
    eval_seed + i (transfusion.generation.row_generators), so two evaluation seeds closer than n_t2i
    draw mostly the same noises, shifted by a prompt or two, and their spread understates the
    sampling's."""
    if not eval_seeds or len(set(eval_seeds)) != len(eval_seeds) or min(eval_seeds) < 0:
        raise ValueError(f"eval_seeds = {eval_seeds} must be distinct integers >= 0")
    ordered = sorted(eval_seeds)
    close = [(a, b) for a, b in zip(ordered, ordered[1:]) if b - a < base.n_t2i]
    if close:
        step = max(1000, base.n_t2i)
        spaced = ", ".join(str(step * (i + 1)) for i in range(len(ordered)))
        raise ValueError(
            f"eval_seeds = {eval_seeds}: {close[0][0]} and {close[0][1]} are closer than "
            f"n_t2i = {base.n_t2i}; image row i is seeded eval_seed + i, so they would share noises. "
            f"Space them at least {base.n_t2i} apart (e.g. {spaced})"
        )


def run_eval_noise(out_dir: str | Path, cfg: StudyConfig, eval_seeds: tuple[int, ...], runs_dir: str | Path,
                   progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Evaluate the study rows of ``cfg`` under every evaluation seed and write the result files."""
    check_eval_seeds(eval_seeds, cfg.base())
    out, runs = Path(out_dir), Path(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = rows_for(cfg.groups)
    lines: list[dict[str, Any]] = []
    compute_s = 0.0
    for k in eval_seeds:
        seeded = StudyConfig(groups=cfg.groups, seeds=cfg.seeds, workers=cfg.workers,
                             quick={**cfg.quick, "eval_seed": k})  # fmt: skip
        records = execute(plan_jobs(seeded, runs), seeded.workers, progress)
        # the evaluations' own times when computed (the reused trainings are the study's cost)
        walls = [ev.get("eval_wall_s") for r in records for ev in r["evals"].values()]
        compute_s += sum(float(w) for w in walls if _number(w))
        lines += [{**ln, "eval_seed": k} for ln in run_rows(rows, records, cfg.seeds, seeded.base())]
    summary = summarize_noise([ln for ln in lines if ln["status"] != "failed"])
    result: dict[str, Any] = {
        "profile": "eval_noise",
        "config": {**cfg.to_dict(), "eval_seeds": list(eval_seeds)},
        "runs_dir": str(runs),
        "summary": summary,
        "runs": lines,
    }
    try:
        from bench.study_plots import plot_eval_noise

        result["plots"] = [str(plot_eval_noise(out, lines))]
    except Exception as e:  # the numbers stand without their pictures
        result["plots_error"] = f"{type(e).__name__}: {e}"
    result["total_wall_s"] = round(time.perf_counter() - t0, 2)
    result["eval_compute_s"] = round(compute_s, 1)
    atomic_write_json(out / "eval_noise.json", result)
    atomic_write_text(out / "eval_noise.csv", to_csv(lines, [*RUN_FIELDS[:5], "eval_seed", *RUN_FIELDS[5:]]))
    atomic_write_text(out / "eval_noise_summary.csv", to_csv(summary, SUMMARY_FIELDS))
    files = ["eval_noise.json", "eval_noise.csv", "eval_noise_summary.csv", "plots/"]
    prov = provenance("cpu", cfg.seeds[0], profile="eval_noise", seeds=list(cfg.seeds),
                      eval_seeds=list(eval_seeds), workers=cfg.workers, threads_per_worker=1,
                      config=result["config"], total_wall_s=result["total_wall_s"],
                      eval_compute_s=result["eval_compute_s"], files=files)  # fmt: skip
    atomic_write_json(out / "eval_noise_provenance.json", prov)
    return result


def _ints(text: str, flag: str, p: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        p.error(f"{flag} {text!r}: expected comma-separated integers")
        raise  # unreachable: p.error exits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench eval_noise",
        description=(
            "Evaluation noise (CPU): evaluate each training seed of some study groups again under several "
            "evaluation seeds (the images' sampling noise and the KID subsets; the same prompts), and set "
            "the spread over evaluation seeds beside the spread over training seeds, per row and metric. "
            "Trainings are reused from the study's runs folder (missing ones are trained)."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("results") / "eval_noise", help="results folder")
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "study",
                   help="the study's training runs (reused; missing ones are trained)")  # fmt: skip
    p.add_argument(
        "--groups",
        default=",".join(DEFAULT_GROUPS),
        help="comma-separated study groups (default: %(default)s); valid: " + ",".join(GROUPS),
    )
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default: %(default)s)")
    p.add_argument("--eval-seeds", default=",".join(map(str, DEFAULT_EVAL_SEEDS)),
                   help="evaluation seeds (default: %(default)s)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a QuickConfig field as in the study (to reuse its trainings, pass what it passed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    quick = parse_set_options(args.set, p)
    if "eval_seed" in quick:
        p.error("--set eval_seed: use --eval-seeds")
    seeds, eval_seeds = _ints(args.seeds, "--seeds", p), _ints(args.eval_seeds, "--eval-seeds", p)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    try:
        cfg = StudyConfig(groups=groups, seeds=seeds, workers=args.workers, quick=quick)
        check_eval_seeds(eval_seeds, cfg.base())
    except (TypeError, ValueError) as e:
        p.error(str(e))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers
    result = run_eval_noise(args.out, cfg, eval_seeds, args.runs_dir, progress=not args.no_progress)
    failed = [ln for ln in result["runs"] if ln["status"] != "ok"]
    for ln in failed:
        print(f"  {ln['label']} seed {ln['seed']} eval seed {ln['eval_seed']}: {ln['status']}: {ln['error']}")
    wrote = "eval_noise.csv, eval_noise_summary.csv, eval_noise.json, plots/"
    print(f"total {result['total_wall_s']:.0f}s; wrote {args.out}/{wrote}")
    return 1 if failed else 0


__all__ = ["DEFAULT_EVAL_SEEDS", "check_eval_seeds", "main", "run_eval_noise", "summarize_noise"]


if __name__ == "__main__":
    sys.exit(main())
