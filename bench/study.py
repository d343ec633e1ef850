"""The ``study`` profile: the paper's ablations and the scaling comparison at toy scale, 2 seeds, on CPU.

Every training of ``bench.study_grid.TRAININGS`` that the chosen groups need is trained for each seed with
the quick profile's recipe and machinery (``bench.quick.train_family``: reused when finished, resumed when
interrupted), then evaluated with each set of evaluation settings its rows ask for
(``bench.quick.eval_family``: the same four metrics as the quick job, cached by fingerprint). Jobs run in
``workers`` processes of one thread each, largest first; the first job of each family runs alone first,
so that the shared autoencoders and latent caches are built once.

Outputs in ``OUT`` (atomically): ``study_runs.csv`` (one line per row and seed), ``study.csv`` (mean and
spread over seeds per row, with the paper's figures beside the matching rows), ``study.json``,
``study_provenance.json`` and ``plots/`` (one figure per group). Training runs and evaluation files live
in ``--runs-dir`` (not results), so a rerun after an interruption picks up where it stopped; each job's
console output goes to ``RUNS/<training>/seed<k>.log``.

Usage: ``python -m bench study [--groups masking,patch] [--seeds 0,1] [--workers 2] [--list]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.quick import EVAL_FIELDS, QuickConfig, check_eval_items, eval_metrics, parse_set_options, to_csv
from bench.quick_curves import CURVE_METRICS, metric_parity
from bench.study_grid import (
    DEFAULT_GROUPS,
    EXTRA_GROUPS,
    FAMILY_LADDERS,
    GROUP_TITLES,
    GROUPS,
    LADDER_LRS,
    LR_CHOICE,
    LR_CHOICE_GROUP,
    SIZES,
    TRAININGS,
    Row,
    eval_key,
    ladder_training,
    rows_for,
    varied_model_fields,
    varied_recipe_fields,
)
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance
from transfusion.value_checks import is_finite_real, is_int

RUN_FIELDS: tuple[str, ...] = (
    "group", "label", "training", "family", "seed", "status", "params", "steps", "train_flops",
    "final_loss", "final_diffusion_loss", "text_bpb", "caption_accuracy", "caption_empty", "t2i_alignment",
    "fid", "kid",
    "recon_fid", "latent_std_ratio", "train_wall_s", "eval_wall_s", "error",
)  # fmt: skip
_TRAIN_FIELDS = ("params", "steps", "train_flops", "final_loss", "final_diffusion_loss", "train_wall_s")
SUMMARY_STATS: tuple[str, ...] = (
    "params",
    "train_flops",
    *CURVE_METRICS,
    "kid",
    "caption_empty",
    "latent_std_ratio",
)


@dataclass
class StudyConfig:
    """What the study runs; the defaults fit <= 90 min on 2 CPU cores (two one-thread workers)."""

    groups: tuple[str, ...] = DEFAULT_GROUPS
    seeds: tuple[int, ...] = (0, 1)
    workers: int = 2
    # the quick profile's recipe for every training (steps, batch, data, evaluation sizes, ...)
    quick: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = tuple(self.groups)
        self.seeds = tuple(int(s) for s in self.seeds)
        rows_for(self.groups)  # names the unknown group
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"StudyConfig.seeds = {self.seeds} must be distinct and non-empty")
        if not is_int(self.workers) or self.workers < 1:
            raise ValueError(f"StudyConfig.workers = {self.workers!r} must be a positive integer")
        per_job = sorted(set(self.quick) & {"seed", "families", "preset", "threads", "progress"})
        if per_job:
            raise ValueError(f"StudyConfig.quick sets {per_job}, which the study sets per job; use --seeds")
        varied = sorted(
            set(self.quick.get("model_overrides", {})) & varied_model_fields(rows_for(self.groups))
        )
        if varied:
            raise ValueError(
                f"StudyConfig.quick.model_overrides sets {varied}, which the study's rows vary; "
                "a common value would make their labels wrong"
            )
        recipe = sorted(set(self.quick) & varied_recipe_fields(rows_for(self.groups)))
        if recipe:
            raise ValueError(
                f"StudyConfig.quick sets {recipe}, which some of the study's trainings set themselves; "
                "a common value would make their labels wrong"
            )
        self.base()  # names a bad quick field

    def base(self) -> QuickConfig:
        return QuickConfig().replace(**{**self.quick, "threads": 1, "progress": False})

    def to_dict(self) -> dict[str, Any]:
        return {"groups": list(self.groups), "seeds": list(self.seeds), "workers": self.workers,
                "quick": self.base().to_dict()}  # fmt: skip


# ---------------------------------------------------------------------- jobs
def eval_overrides(row: Row, base: QuickConfig) -> dict[str, Any]:
    """The row's evaluation settings under ``base`` that differ from QuickConfig's defaults. So one
    evaluation has one folder whichever way it is asked for (a row that names the default 250 steps
    shares the default evaluation, also when ``--set`` changes the steps), and a ``--set`` of an
    evaluation field (n_t2i, eval_seed, ...) gets folders of its own instead of replacing the
    default evaluations."""
    effective, default = base.replace(**row.eval).to_dict(), QuickConfig().to_dict()
    return {k: effective[k] for k in dict.fromkeys([*EVAL_FIELDS, *row.eval]) if effective[k] != default[k]}


def plan_jobs(cfg: StudyConfig, runs_dir: Path, fresh: bool = False) -> list[dict[str, Any]]:
    """One job per (training, seed), with every evaluation its rows need; largest models first."""
    from transfusion.config import get_preset

    base = cfg.base()
    rows = rows_for(cfg.groups)
    jobs = []
    for name in dict.fromkeys(r.training for r in rows):
        t = TRAININGS[name]
        evals = {eval_key(o): o for o in (eval_overrides(r, base) for r in rows if r.training == name)}
        model_overrides = {**base.model_overrides, **t.model}
        size = get_preset(t.preset, **model_overrides)
        for seed in cfg.seeds:
            jobs.append({
                "training": name,
                "family": t.family,
                "seed": seed,
                "quick": base.replace(seed=seed, families=(t.family,), preset=t.preset,
                                      model_overrides=model_overrides, **t.recipe).to_dict(),
                "evals": evals,
                "run_dir": str(runs_dir / name / f"seed{seed}"),
                "fresh": fresh,
                "cost": size.dim**2 * size.n_layers * (2 if size.adapter == "unet" else 1),
            })  # fmt: skip
    jobs.sort(key=lambda j: -j["cost"])
    return jobs


def _metrics_of(ev: dict[str, Any]) -> dict[str, Any]:
    return {**eval_metrics(ev), "fid_error": (ev.get("fid") or {}).get("error")}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse) one training for one seed and run its evaluations; never raises."""
    import torch

    from bench.quick import eval_family, train_family

    torch.set_num_threads(1)
    with contextlib.suppress(ImportError):  # diffusers' "install accelerate" advice, once per model load
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    run_dir = Path(job["run_dir"])
    # beside the run directory, which the trainer may discard and rebuild
    log_file = run_dir.parent / f"{run_dir.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"training": job["training"], "seed": job["seed"], "train": None, "evals": {},
                           "eval_errors": {}, "errors": [], "reused": True}  # fmt: skip
    # the trainer's and evaluator's logs go to the run's own log file, not the study's console
    with (
        open(log_file, "a") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        cfg = QuickConfig.from_dict(job["quick"])
        try:
            summary = train_family(cfg, job["family"], run_dir, 1, job["fresh"])
            rec["reused"] = bool(summary.pop("_reused", False))
            rec["train"] = summary
        except Exception as e:  # recorded; the study goes on
            rec["errors"].append(f"train: {type(e).__name__}: {e}")
            traceback.print_exc(file=log)
            return rec
        for key, overrides in job["evals"].items():
            try:
                ev = eval_family(
                    cfg.replace(**overrides), job["family"], run_dir, run_dir / "eval" / key, job["fresh"]
                )
                rec["reused"] = rec["reused"] and bool(ev.get("_reused"))
                rec["evals"][key] = _metrics_of(ev)
            except Exception as e:  # fails the rows of this evaluation only
                rec["eval_errors"][key] = f"eval {key}: {type(e).__name__}: {e}"
                traceback.print_exc(file=log)
    # What the job costs when computed, read from its stored results, so reruns that reuse them still
    # report it: training wall time plus each evaluation's (the shared autoencoders are not counted).
    parts = [summary.get("train_wall_s")] + [ev.get("eval_wall_s") for ev in rec["evals"].values()]
    rec["compute_s"] = round(sum(float(x) for x in parts if is_finite_real(x)), 2)
    return rec


def execute(
    jobs: list[dict[str, Any]],
    workers: int,
    progress: bool = True,
    worker: Callable[[dict[str, Any]], dict[str, Any]] = run_job,
) -> list[dict[str, Any]]:
    """Run the jobs in ``workers`` one-thread processes, in the given order, except that a family's first
    job runs before the rest of that family (it builds the family's autoencoder and latent cache, which
    the others then read). A worker process that dies (killed, out of memory) breaks the pool: the jobs
    not finished by then are recorded as failed, the study's files are still written, and a rerun resumes
    them from their checkpoints."""
    from tqdm import tqdm

    first: dict[str, dict] = {}
    for j in jobs:
        first.setdefault(j["family"], j)
    records: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(jobs), desc="study", unit="run", disable=not progress, dynamic_ncols=True, file=sys.stderr
    )

    def done(rec: dict[str, Any]) -> None:
        records.append(rec)
        status = "failed" if rec["errors"] else ("reused" if rec["reused"] else "ok")
        bar.set_postfix_str(f"{rec['training']} seed{rec['seed']}: {status}")
        bar.update(1)

    def failed(job: dict[str, Any], e: BaseException) -> dict[str, Any]:
        error = f"worker: {type(e).__name__}: {e}"
        return {"training": job["training"], "seed": job["seed"], "train": None, "evals": {},
                "eval_errors": {}, "errors": [error], "reused": False}  # fmt: skip

    if workers == 1:  # in-process: easier to debug, no process start-up
        warmups = list(first.values())
        for j in [*warmups, *(j for j in jobs if all(j is not w for w in warmups))]:
            done(worker(j))
        bar.close()
        return records
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Future, dict[str, Any]] = {}

        def submit(batch: list[dict[str, Any]]) -> None:
            for j in batch:
                try:
                    pending[pool.submit(worker, j)] = j
                except BrokenProcessPool as e:
                    done(failed(j, e))

        submit(list(first.values()))
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                try:
                    done(fut.result())
                except Exception as e:
                    done(failed(job, e))
                if job is first[job["family"]]:  # the family's caches exist now: release its other jobs
                    submit([j for j in jobs if j["family"] == job["family"] and j is not job])
    bar.close()
    return records


# ---------------------------------------------------------------------- tables
def run_rows(
    rows: list[Row], records: list[dict[str, Any]], seeds: tuple[int, ...], base: QuickConfig | None = None
) -> list[dict[str, Any]]:
    """One line per (row, seed): the training's summary and the row's evaluation."""
    by_key = {(r["training"], r["seed"]): r for r in records}
    base = base or QuickConfig()
    out = []
    for row in rows:
        key = eval_key(eval_overrides(row, base))
        for seed in seeds:
            rec = by_key.get((row.training, seed))
            line: dict[str, Any] = {k: None for k in RUN_FIELDS}
            line.update(group=row.group, label=row.label, training=row.training,
                        family=TRAININGS[row.training].family, seed=seed)  # fmt: skip
            errors = list(rec["errors"]) if rec else ["not run"]
            if rec and key in rec.get("eval_errors", {}):
                errors.append(rec["eval_errors"][key])
            if rec and rec["train"]:
                for k in _TRAIN_FIELDS:
                    line[k] = rec["train"].get(k)
            ev = (rec or {}).get("evals", {}).get(key)
            if ev:  # bench.quick.eval_metrics's columns (and fid_error, which is no column)
                line.update({k: v for k, v in ev.items() if k in RUN_FIELDS})
                if ev.get("fid_error"):
                    errors.append(f"fid: {ev['fid_error']}")
            if rec and not ev and not errors:
                errors.append(f"eval {key}: not run")
            line["status"] = "ok" if not errors else ("partial" if ev else "failed")
            line["error"] = "; ".join(errors) or None
            out.append(line)
    return out


def summarize_rows(rows: list[Row], lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds per row, with the paper's figures beside it."""
    out = []
    for row in rows:
        mine = [ln for ln in lines if ln["group"] == row.group and ln["label"] == row.label]
        s: dict[str, Any] = {"group": row.group, "label": row.label, "training": row.training,
                             "family": TRAININGS[row.training].family, "series": row.series,
                             "n_seeds": sum(ln["status"] != "failed" for ln in mine)}  # fmt: skip
        for stat in SUMMARY_STATS:
            vals = [float(ln[stat]) for ln in mine if is_finite_real(ln[stat])]
            s[f"{stat}_mean"] = sum(vals) / len(vals) if vals else None
            s[f"{stat}_std"] = _sample_std(vals) if len(vals) > 1 else None
            s[f"{stat}_n"] = len(vals)
        for k in ("paper_c4_ppl", "paper_cider", "paper_fid", "paper_clip"):
            s[k] = row.paper.get(k)
        out.append(s)
    return out


def _sample_std(vals: list[float]) -> float:
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _ladder_parity(rows: list[dict[str, Any]], metric: str, lower: bool) -> dict | None | str:
    """One metric's parity FLOP ratio across the summary ``rows`` of a family ladder: Transfusion's
    (FLOPs, metric) points against the largest discrete model's final value and FLOPs; "absent" when the
    ladder lacks a family."""
    tf = sorted((s for s in rows if s["family"] == "transfusion" and s["train_flops_mean"]),
                key=lambda s: s["train_flops_mean"])  # fmt: skip
    disc = [s for s in rows if s["family"] == "discrete" and s["train_flops_mean"]]
    if not tf or not disc:
        return "absent"
    top = max(disc, key=lambda s: s["train_flops_mean"])

    def point(s: dict[str, Any]) -> dict[str, Any]:  # a size's means as a curve point
        return {"train_flops": s["train_flops_mean"], **{m: s[f"{m}_mean"] for m in CURVE_METRICS}}

    try:
        par = metric_parity([point(s) for s in tf], point(top), metric, lower)
    except ValueError as e:  # e.g. two sizes with equal FLOPs: recorded, the study's files still written
        return {"error": str(e), "display": "-", "baseline": top["label"]}
    return None if par is None else {**par, "baseline": top["label"]}


def scaling_parity(summary: list[dict[str, Any]], group: str = "scaling") -> dict[str, dict | None]:
    """Parity FLOP ratios read across a family size ladder: Transfusion's (FLOPs, metric) points against
    the largest discrete model's final value and FLOPs (paper Table 3's reading of its scaling curves)."""
    rows = [s for s in summary if s["group"] == group]
    out = {m: _ladder_parity(rows, m, lower) for m, lower in CURVE_METRICS.items()}
    return {} if "absent" in out.values() else out


def lr_choice(
    summary: list[dict[str, Any]], seeds: int | None = None, lines: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The learning rate chosen on the val split, per metric, family and size, and the ladders it gives.

    For each metric, each (family, size) takes the rate of LADDER_LRS whose val-split mean of that metric
    is best (the rate's val rows, LR_CHOICE), and its test-split row from that rate's test ladder. A rate
    is a candidate only where both rows hold that metric for every one of the ``seeds`` seeds (default: the
    row's own count of seeds that did not fail): not where an extra group did not run, nor where a seed
    failed or diverged (a one-seed mean against two-seed means). The chosen rows form one
    ladder per metric, read for its parity FLOP ratio like the fixed-rate ladders: both families tuned
    for the metric on held-out data, as one would before comparing them.

    With the per-seed ``lines``, each choice also names its runner-up rate and the chosen rate's paired
    val lead over it (``paired_margin``: the mean, standard error and paired t-test, over training seeds,
    of the difference between the two models of one seed). Both share that seed's initial weights, data
    order and noise pool, so the difference leaves out what the two means share; the prompts are the
    same for every model, so the test holds for them only. Equal val means go to the rate listed first
    in LADDER_LRS (the lead then reads 0)."""

    def by_training(group: str) -> dict[str, dict[str, Any]]:
        return {s["training"]: s for s in summary if s["group"] == group}

    per_seed: dict[tuple[str, str, str], dict[int, float]] = {}  # (group, training, metric) -> seed -> value
    for line in lines or ():
        for metric in CURVE_METRICS:
            if is_finite_real(value := line.get(metric)):
                per_seed.setdefault((line["group"], line["training"], metric), {})[line["seed"]] = value
    val = {lr: by_training(val_group) for lr, (val_group, _) in LR_CHOICE.items()}
    tests = {lr: by_training(test_group) for lr, (_, test_group) in LR_CHOICE.items()}
    choices: list[dict[str, Any]] = []
    parity: dict[str, dict | None] = {}
    for metric, lower in CURVE_METRICS.items():
        ladder = []
        for family in ("transfusion", "discrete"):
            for size in SIZES:
                scored = {}  # lr -> (val mean, test summary row)
                for lr, suffix in LADDER_LRS.items():
                    training = ladder_training(family, size, suffix)
                    v_row, t_row = val[lr].get(training), tests[lr].get(training)
                    if _complete(v_row, metric, seeds) and _complete(t_row, metric, seeds):
                        scored[lr] = (float(v_row[f"{metric}_mean"]), t_row)
                if not scored:
                    continue
                ranked = sorted(scored, key=lambda lr: scored[lr][0], reverse=not lower)
                best = ranked[0]
                ladder.append(scored[best][1])
                choice = {"metric": metric, "family": family, "size": size, "lr": best,
                          **{f"val_{lr}": v for lr, (v, _) in scored.items()}}  # fmt: skip
                if lines is not None and len(ranked) > 1:
                    runner_up = ranked[1]
                    seeds_of = {
                        lr: per_seed.get(
                            (LR_CHOICE[lr][0], ladder_training(family, size, LADDER_LRS[lr]), metric), {}
                        )
                        for lr in (best, runner_up)
                    }
                    choice.update(
                        runner_up=runner_up, **paired_margin(seeds_of[best], seeds_of[runner_up], lower)
                    )
                choices.append(choice)
        par = _ladder_parity(ladder, metric, lower)
        parity[metric] = None if par == "absent" else par
    return {"choices": choices, "parity": parity}


def paired_margin(best: dict[int, float], other: dict[int, float], lower: bool) -> dict[str, Any]:
    """How far ``best`` leads ``other`` seed by seed (each a seed -> value map; positive: ``best`` is
    better): ``margin`` (mean), ``margin_se`` (standard error), ``margin_p`` (two-sided paired t-test that
    the lead is 0), ``margin_n`` (seeds both hold). The spread needs two seeds and the test a spread
    (else None)."""
    from scipy import stats

    diffs = [other[s] - best[s] if lower else best[s] - other[s] for s in sorted(set(best) & set(other))]
    n = len(diffs)
    out: dict[str, Any] = {"margin": sum(diffs) / n if n else None, "margin_se": None, "margin_p": None}
    if n > 1:
        out["margin_se"] = math.sqrt(sum((d - out["margin"]) ** 2 for d in diffs) / (n - 1) / n)
        if out["margin_se"] > 0:  # (every seed the same lead, as quantized scores allow: nothing to test)
            out["margin_p"] = float(2 * stats.t.sf(abs(out["margin"]) / out["margin_se"], n - 1))
    return {**out, "margin_n": n}


def _complete(row: dict[str, Any] | None, metric: str, seeds: int | None) -> bool:
    """Whether a summary row holds ``metric`` for all ``seeds`` seeds (None: its non-failed ones)."""
    if not row or not is_finite_real(row.get(f"{metric}_mean")):
        return False
    return row.get(f"{metric}_n") == (row.get("n_seeds") if seeds is None else seeds)


def lr_choice_rates(groups: tuple[str, ...] | list[str]) -> list[str]:
    """The learning rates whose val rows and test ladder are both among ``groups``: the candidates of
    lr_choice, which runs when there are at least two."""
    return [lr for lr, lr_groups in LR_CHOICE.items() if set(lr_groups) <= set(groups)]


# ---------------------------------------------------------------------- the profile
def run_study(out_dir: str | Path, cfg: StudyConfig, runs_dir: str | Path, fresh: bool = False,
              progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the study and write its result files; returns what ``study.json`` holds."""
    from bench.quick import reference_scores
    from bench.study_plots import plot_study

    check_eval_items(cfg.base())  # before anything trains
    out, runs = Path(out_dir), Path(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = rows_for(cfg.groups)
    jobs = plan_jobs(cfg, runs, fresh)
    records = execute(jobs, cfg.workers, progress)
    lines = run_rows(rows, records, cfg.seeds, cfg.base())
    summary = summarize_rows(rows, lines)
    parity = {g: scaling_parity(summary, g) for g in cfg.groups if g in FAMILY_LADDERS}
    chosen = None
    if len(lr_choice_rates(cfg.groups)) >= 2:
        chosen = lr_choice(summary, seeds=len(cfg.seeds), lines=lines)
        parity[LR_CHOICE_GROUP] = chosen["parity"]
    try:  # chance levels of the judge (shuffled pairs), drawn on the plots
        references = reference_scores(cfg.base())
    except Exception as e:
        references = {"error": f"{type(e).__name__}: {e}"}
    result = {
        "profile": "study",
        "config": cfg.to_dict(),
        "runs_dir": str(runs),
        "summary": summary,
        "runs": lines,
        "parity": parity,
        "lr_choice": chosen,
        "references": references,
        "jobs": sorted(
            ({k: v for k, v in r.items() if k != "evals"} for r in records),
            key=lambda r: (r["training"], r["seed"]),
        ),  # fmt: skip
    }
    try:
        result["plots"] = [str(p) for p in plot_study(out, summary, lines, references)]
    except Exception as e:  # the numbers stand without their pictures
        result["plots_error"] = f"{type(e).__name__}: {e}"
    result["total_wall_s"] = round(time.perf_counter() - t0, 2)
    # the jobs' own times when they were computed: what a fresh study costs, however many reruns it took
    result["jobs_compute_s"] = round(sum(j.get("compute_s") or 0.0 for j in result["jobs"]), 1)
    atomic_write_json(out / "study.json", result)
    atomic_write_text(out / "study_runs.csv", to_csv(lines, RUN_FIELDS))
    atomic_write_text(out / "study.csv", to_csv(summary, list(summary[0]) if summary else []))
    prov = provenance("cpu", cfg.seeds[0], profile="study", seeds=list(cfg.seeds), workers=cfg.workers,
                      threads_per_worker=1, config=cfg.to_dict(), total_wall_s=result["total_wall_s"],
                      jobs_compute_s=result["jobs_compute_s"],
                      files=["study.json", "study.csv", "study_runs.csv", "plots/"])  # fmt: skip
    atomic_write_json(out / "study_provenance.json", prov)
    return result


def parse_ints(text: str, flag: str, p: argparse.ArgumentParser) -> tuple[int, ...]:
    """A comma-separated list of integers from the command line, or ``p.error`` naming the flag."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        p.error(f"{flag} {text!r}: expected comma-separated integers")
        raise  # unreachable: p.error exits


def parse_groups(text: str) -> tuple[str, ...]:
    """A comma-separated list of study groups; 'all' anywhere in it means every group."""
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    return GROUPS if "all" in groups else groups


def _listing(cfg: StudyConfig, runs_dir: Path) -> str:
    jobs = plan_jobs(cfg, runs_dir)
    lines = [f"{len(jobs)} jobs ({len(jobs) // len(cfg.seeds)} trainings x {len(cfg.seeds)} seeds):"]
    for g in cfg.groups:
        lines.append(f"  {g}: {GROUP_TITLES[g]}")
        for r in rows_for((g,)):
            t = TRAININGS[r.training]
            parts = (t.family, t.preset, t.model or "", t.recipe or "", r.eval or "")
            lines.append(f"    {r.label:<28} " + " ".join(str(x) for x in parts if x != ""))
    return "\n".join(lines)


class WholeNamesHelpFormatter(argparse.HelpFormatter):
    """Wraps --help text at spaces only, so that a name in it (a group such as ``scaling_lr_3e-3``) is never
    broken and can be copied: argparse's own formatter also breaks at hyphens and inside long words."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False, break_long_words=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench study",
        formatter_class=WholeNamesHelpFormatter,
        description=(
            "Study profile (CPU, <= 90 min with 2 workers): the paper's ablations (attention masking, patch "
            "size, linear vs U-Net, noise limiting), then lambda, CFG dropout, inference steps, guidance "
            "scale, the x_0 clamp and both families' samplers (also chosen on the val split), eps vs v "
            "prediction and the diffusion loss's timestep weighting, the loss after dropped captions, and "
            "Transfusion vs the discrete baseline across 3 sizes (with several samplers, at the paper's "
            "learning rate too, and with each size's learning rate chosen on the val split; learning rates "
            "3e-3 and 1e-2 are extra groups, run by --groups all). Every row is trained for each seed with "
            "the quick recipe and judged on the quick job's metrics. --list prints the grid."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("results") / "study", help="results folder")
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "study",
                   help="training runs and evaluations (reused and resumed on reruns)")  # fmt: skip
    p.add_argument(
        "--groups",
        default=",".join(DEFAULT_GROUPS),
        help=f"comma-separated groups (default: every group but the extra ones, {', '.join(EXTRA_GROUPS)}, "
        "which would take the study past 90 minutes; 'all' runs every group); valid: " + ", ".join(GROUPS),
    )
    p.add_argument("--seeds", default="0,1", help="comma-separated training/evaluation seeds")
    p.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (quick default: 400)")
    p.add_argument("--cache-dir", default=None, help="autoencoder/latent cache (default: TRANSFUSION_CACHE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a QuickConfig field for every training, e.g. --set n_t2i=32")  # fmt: skip
    p.add_argument("--fresh", action="store_true", help="retrain and re-evaluate instead of reusing")
    p.add_argument("--list", action="store_true", help="print the grid and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    quick = parse_set_options(args.set, p)
    if args.steps is not None:
        quick["steps"] = args.steps
    if args.cache_dir is not None:
        quick["cache_dir"] = args.cache_dir
    seeds, groups = parse_ints(args.seeds, "--seeds", p), parse_groups(args.groups)
    try:
        cfg = StudyConfig(groups=groups, seeds=seeds, workers=args.workers, quick=quick)
        check_eval_items(cfg.base())
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if args.list:
        print(_listing(cfg, args.runs_dir))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers
    result = run_study(args.out, cfg, args.runs_dir, fresh=args.fresh, progress=not args.no_progress)
    failed = [ln for ln in result["runs"] if ln["status"] != "ok"]
    for ln in failed:
        print(f"  {ln['group']}/{ln['label']} seed {ln['seed']}: {ln['status']}: {ln['error']}")
    print(
        f"total {result['total_wall_s']:.0f}s (the jobs' own compute: {result['jobs_compute_s']:.0f}s in "
        f"{cfg.workers} workers); wrote {args.out}/study.csv, study_runs.csv, study.json, plots/"
    )
    from bench.report import build_report

    print(f"wrote {build_report(Path(args.out).parent)}")
    return 1 if failed else 0


__all__ = [
    "StudyConfig",
    "WholeNamesHelpFormatter",
    "lr_choice",
    "lr_choice_rates",
    "main",
    "parse_groups",
    "parse_ints",
    "plan_jobs",
    "run_job",
    "run_study",
    "scaling_parity",
]


if __name__ == "__main__":
    sys.exit(main())
