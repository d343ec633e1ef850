"""Evaluation noise: how much of a study row's spread over training seeds is the evaluation's sampling.

    python -m bench eval_noise [--groups lr_choice_val] [--seeds 0,1,2] [--eval-seeds 1000,2000,3000]

Every (training, seed) of the groups' rows is taken from the study's runs and evaluated again under
each evaluation seed (``QuickConfig.eval_seed``: the images' sampling noise and the KID subsets; the
prompts, images and texts stay the split's first items). The design is crossed: every training seed
meets every evaluation seed, and an evaluation seed draws the same noises for all of them. Per row and
metric, from the table x[s, k] (training seed s, evaluation seed k; n_s x n_e, one value per cell):

- ``sampling_std``: the spread over evaluation seeds with the weights fixed, pooled over the training
  seeds (the root of the mean within-training sample variance): how far one evaluation of one model
  can move;
- ``seed_std``: the spread over training seeds of each training's mean over evaluation seeds;
- ``training_std``: the training seed's own spread, from a two-way random-effects reading,
  sqrt(max(0, seed_std**2 - MS_int / n_e)), where MS_int is the interaction (residual) mean square;
  the evaluation seeds' shared effect cancels out of ``seed_std``, so only the interaction is removed;
- ``pool_std``: the evaluation seed's effect shared by every training seed (common random numbers),
  sqrt(max(0, var_k(mean_s x) - MS_int / n_s)): how far a change of noise pool moves all of a row's
  models together.

Bits per byte draw no samples and captions are decoded greedily, so their ``sampling_std`` and
``pool_std`` are exactly 0: a check that only the sampling moved.

Writes OUT/eval_noise.csv (a line per row, training seed and evaluation seed), OUT/eval_noise_summary.csv,
OUT/eval_noise.json, OUT/eval_noise_provenance.json and OUT/plots/eval_noise.png. The evaluations live
beside the study's in the run folders (``eval/...-eval_seed=K``) and are reused on reruns.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.quick import (
    QuickConfig,
    _run_fingerprint,
    check_eval_items,
    parse_set_options,
    stored_run_fingerprint,
    to_csv,
)
from bench.quick_curves import CURVE_METRICS
from bench.study import (
    RUN_FIELDS,
    StudyConfig,
    WholeNamesHelpFormatter,
    execute,
    parse_groups,
    parse_ints,
    plan_jobs,
    run_rows,
)
from bench.study_grid import GROUPS, rows_for
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance
from transfusion.value_checks import is_finite_real

DEFAULT_GROUPS: tuple[str, ...] = ("lr_choice_val",)
DEFAULT_EVAL_SEEDS: tuple[int, ...] = (1000, 2000, 3000)
SUMMARY_FIELDS: tuple[str, ...] = (
    "group", "label", "training", "metric", "n_seeds", "n_eval_seeds", "mean", "sampling_std", "seed_std",
    "training_std", "pool_std",
)  # fmt: skip


def crossed_spreads(table: list[list[float]]) -> dict[str, float | None]:
    """The four spreads of the module docstring for one table (rows: training seeds, columns: evaluation
    seeds, every cell filled). Exact arithmetic (statistics' fractions), so a constant metric reads 0."""
    n_s, n_e = len(table), len(table[0]) if table else 0
    out: dict[str, float | None] = dict.fromkeys(
        ("mean", "sampling_std", "seed_std", "training_std", "pool_std")
    )
    if not n_s or not n_e:
        return out
    out["mean"] = statistics.mean(v for row in table for v in row)
    row_means = [statistics.mean(row) for row in table]
    if n_e > 1:
        out["sampling_std"] = math.sqrt(statistics.mean(statistics.variance(row) for row in table))
    if n_s > 1:
        out["seed_std"] = statistics.stdev(row_means)
    if n_s > 1 and n_e > 1:
        col_means = [statistics.mean(col) for col in zip(*table)]
        grand = statistics.mean(row_means)
        ss_int = sum(
            (table[s][k] - row_means[s] - col_means[k] + grand) ** 2 for s in range(n_s) for k in range(n_e)
        )
        ms_int = ss_int / ((n_s - 1) * (n_e - 1))
        out["training_std"] = math.sqrt(max(0.0, statistics.variance(row_means) - ms_int / n_e))
        out["pool_std"] = math.sqrt(max(0.0, statistics.variance(col_means) - ms_int / n_s))
    return out


def summarize_noise(
    lines: list[dict[str, Any]],
    eval_seeds: tuple[int, ...] | list[int] | None = None,
    metrics: tuple[str, ...] = CURVE_METRICS,
) -> list[dict[str, Any]]:
    """Per row and metric, ``crossed_spreads`` of its table. A training seed counts only when it holds
    the metric under every one of ``eval_seeds`` (default: every evaluation seed in ``lines``), so the
    table stays balanced; ``n_seeds`` says how many did."""
    wanted = sorted(set(eval_seeds) if eval_seeds is not None else {ln["eval_seed"] for ln in lines})
    out = []
    for key in dict.fromkeys((ln["group"], ln["label"], ln["training"]) for ln in lines):
        mine = [ln for ln in lines if (ln["group"], ln["label"], ln["training"]) == key]
        for metric in metrics:
            cells: dict[int, dict[int, float]] = {}
            for ln in mine:
                if ln["eval_seed"] in wanted and is_finite_real(ln.get(metric)):
                    cells.setdefault(ln["seed"], {})[ln["eval_seed"]] = float(ln[metric])
            table = [[c[k] for k in wanted] for _, c in sorted(cells.items()) if set(c) == set(wanted)]
            row: dict[str, Any] = dict(zip(("group", "label", "training"), key))
            row.update(metric=metric, n_seeds=len(table), n_eval_seeds=len(wanted), **crossed_spreads(table))
            out.append(row)
    return out


def check_eval_seeds(eval_seeds: tuple[int, ...]) -> None:
    """Refuse fewer than two evaluation seeds, repeats, and seeds QuickConfig refuses (those outside 0 to
    SAMPLING_SEED_LIMIT - 1). Any two distinct seeds it accepts draw disjoint noises: Transfusion's image
    rows start at eval_seed * IMAGE_POOL_STRIDE (bench.quick), the baseline's are drawn from a generator
    seeded with eval_seed."""
    if len(eval_seeds) < 2 or len(set(eval_seeds)) != len(eval_seeds):
        raise ValueError(f"eval_seeds = {eval_seeds} must be at least two distinct integers")
    for k in eval_seeds:
        QuickConfig(eval_seed=k)


def check_trained_alike(jobs: list[dict[str, Any]]) -> None:
    """Refuse run folders trained with other settings: the trainer would discard them (and the study's
    evaluations inside) and train again, and this command only means to evaluate."""
    for job in jobs:
        run_dir = Path(job["run_dir"])
        stored = stored_run_fingerprint(run_dir)
        if stored is not None and stored != _run_fingerprint(
            QuickConfig.from_dict(job["quick"]), job["family"]
        ):
            raise ValueError(
                f"{run_dir} was trained with other settings than these (its quick_fingerprint.json differs); "
                "eval_noise would discard it. Pass the study's own --set values, or another --runs-dir"
            )


def run_eval_noise(out_dir: str | Path, cfg: StudyConfig, eval_seeds: tuple[int, ...], runs_dir: str | Path,
                   progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Evaluate the study rows of ``cfg`` under every evaluation seed and write the result files."""
    check_eval_seeds(eval_seeds)
    check_eval_items(cfg.base())
    check_trained_alike(plan_jobs(cfg, Path(runs_dir)))
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
        compute_s += sum(float(w) for w in walls if is_finite_real(w))
        lines += [{**ln, "eval_seed": k} for ln in run_rows(rows, records, cfg.seeds, seeded.base())]
    summary = summarize_noise([ln for ln in lines if ln["status"] != "failed"], eval_seeds)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench eval_noise",
        formatter_class=WholeNamesHelpFormatter,
        description=(
            "Evaluation noise (CPU): evaluate each training seed of some study groups again under several "
            "evaluation seeds (the images' sampling noise and the KID subsets; the same prompts), and set "
            "the spread over evaluation seeds beside the spread over training seeds, per row and metric. "
            "Trainings are reused from the study's runs folder (missing ones are trained; one trained with "
            "other settings is refused, not discarded)."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("results") / "eval_noise", help="results folder")
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "study",
                   help="the study's training runs (reused; missing ones are trained)")  # fmt: skip
    p.add_argument(
        "--groups",
        default=",".join(DEFAULT_GROUPS),
        help="comma-separated study groups (default: %(default)s; 'all': every group); valid: "
        + ", ".join(GROUPS),
    )
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default: %(default)s)")
    p.add_argument(
        "--eval-seeds",
        default=",".join(map(str, DEFAULT_EVAL_SEEDS)),
        help="at least two distinct evaluation seeds, from 0 to 4095 (default: %(default)s)",
    )
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
    seeds, eval_seeds = parse_ints(args.seeds, "--seeds", p), parse_ints(args.eval_seeds, "--eval-seeds", p)
    groups = parse_groups(args.groups)
    try:
        cfg = StudyConfig(groups=groups, seeds=seeds, workers=args.workers, quick=quick)
        check_eval_items(cfg.base())
        check_eval_seeds(eval_seeds)
        check_trained_alike(plan_jobs(cfg, args.runs_dir))
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


__all__ = [
    "DEFAULT_EVAL_SEEDS",
    "check_eval_seeds",
    "check_trained_alike",
    "crossed_spreads",
    "main",
    "run_eval_noise",
    "summarize_noise",
]


if __name__ == "__main__":
    sys.exit(main())
