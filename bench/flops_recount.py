"""Recount a finished study's training FLOPs with attention on allowed pairs only, and its parity ratios.

Studies trained before the trainer counted attention on allowed (query, key) pairs (DESIGN section 5) hold
FLOPs as the FlopCounterMode saw them through the ``sdpa`` backend: every L x L pair, with a flash backward
(``transfusion.flops``). Their runs directories are not kept, and retraining a study takes hours, but a
step's FLOPs do not depend on the weights: this command rebuilds the first training step of every
(training, seed) of the study's parity ladders (the same data, seed and model; one step, no update) and
counts it both ways. It then

* checks the reproduction: the old-style count times the run's steps must equal the study's stored
  ``train_flops`` (to 1e-9). A folder whose counts match the new style instead is refused (nothing to
  recount); if any run matches neither, no ratio is recounted (it would mix counts) and the exit status
  is 1; a run with no stored count (a failed one) is left out;
* rescales each run's ``train_flops`` by new / old, and recomputes the summary means and every parity FLOP
  ratio with the study's own functions (``bench.study``).

Nothing else changes: the metrics are the study's. Writes ``flops_recount.json``, ``flops_recount.md`` and
``flops_recount_provenance.json`` into the study folder.

A quick job's folder (``quick.json``) is recounted the same way: each family's first step, its
checkpoint curve rescaled, its parity ratios read off the curves again.

Usage: ``python -m bench flops-recount results/study [--runs-dir /tmp/recount]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.quick import EVAL_FIELDS, QuickConfig, model_and_train_config
from bench.study import (
    LR_CHOICE_GROUP,
    StudyConfig,
    lr_choice,
    lr_choice_rates,
    plan_jobs,
    scaling_parity,
    summarize_rows,
)
from bench.study_grid import FAMILY_LADDERS, LR_CHOICE, rows_for
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance

# QuickConfig fields that cannot change a first step's FLOPs (the schedule, logging, checkpoints, threads,
# and evaluation settings); every other field tells trainings apart for the recount.
_NOT_FLOPS = {"lr", "warmup_steps", "steps", "log_every", "curve_points", "threads", "progress", "families",
              *EVAL_FIELDS}  # fmt: skip
REL_TOL = 1e-9
# what a run's stored count says when the rebuilt first step is counted both ways
REPRODUCED, ALREADY, MISMATCH, NO_COUNT = (
    "reproduced",
    "already on allowed pairs",
    "mismatch",
    "no stored count",
)


def parity_groups(groups: list[str]) -> list[str]:
    """The study's groups that enter a parity ratio: its family ladders and, where it chose among at least
    two learning rates, the lr choice's groups."""
    rates = lr_choice_rates(groups)
    chosen = {g for lr in rates for g in LR_CHOICE[lr]} if len(rates) >= 2 else set()
    return [g for g in groups if g in FAMILY_LADDERS or g in chosen]


def recounted_parity(folder: Path) -> dict[str, dict]:
    """A results folder's parity ratios recounted on allowed pairs (flops_recount.json), per group
    ("quick" for a quick job's folder); empty without a recount, or where it did not reproduce."""
    path = folder / "flops_recount.json"
    if not path.exists():
        return {}
    return {g: par for g, par in (json.loads(path.read_text()).get("parity_allowed_pairs") or {}).items()
            if par and any(par.values())}  # fmt: skip


def parity_list(parity: dict) -> str:
    """``metric: reading; ...`` of one group's parity ratios (metrics without a reading left out)."""
    return "; ".join(f"{m}: {p['display']}" for m, p in parity.items() if p)


def study_config(study: dict[str, Any], groups: list[str]) -> StudyConfig:
    """The StudyConfig of a study.json, restricted to ``groups``: its quick recipe where it differs from
    QuickConfig's defaults (the rest is set per job)."""
    default = QuickConfig().to_dict()
    per_job = {"seed", "families", "preset", "threads", "progress"}
    quick = {k: v for k, v in study["config"]["quick"].items() if k not in per_job and v != default.get(k)}
    return StudyConfig(groups=tuple(groups), seeds=tuple(study["config"]["seeds"]), workers=1, quick=quick)


def flops_key(job: dict[str, Any]) -> str:
    """What decides a job's first-step FLOPs: its family and every recipe field that can change them."""
    quick = {k: v for k, v in job["quick"].items() if k not in _NOT_FLOPS}
    return json.dumps({"family": job["family"], **quick}, sort_keys=True)


def count_first_step(job: dict[str, Any], run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Train ``job``'s training for one step in a fresh ``run_dir`` (autoencoders cached in ``cache_dir``;
    its console output in ``run_dir``.log) and return the FLOPs its config.json records."""
    from transfusion.train import train

    cfg = QuickConfig.from_dict(job["quick"]).replace(cache_dir=str(cache_dir), progress=False)
    model_cfg, train_cfg = model_and_train_config(cfg, job["family"], threads=1)
    train_cfg = train_cfg.replace(steps=1, ckpt_every=0, keep_checkpoints=1, log_every=1)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun into the same --runs-dir starts over
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(run_dir.with_suffix(".log"), "w") as f,
        contextlib.redirect_stdout(f),
        contextlib.redirect_stderr(f),
    ):
        train(model_cfg, train_cfg, run_dir, resume=False, preset=cfg.preset)
    flops = json.loads((run_dir / "config.json").read_text())["flops"]
    return {k: flops[k] for k in ("measured_step", "counted_step", "counted_attention", "source")}


def _count_line(job: dict[str, Any], got: dict[str, Any], old_total: float | None, steps: int | None) -> dict:
    """One run's recount: its old and new FLOPs per step, and what its stored total says (``state``):
    REPRODUCED (old per step x steps, to REL_TOL), ALREADY (new per step x steps: trained with allowed
    pairs), MISMATCH, or NO_COUNT (a failed run, none stored)."""
    old, new = got["counted_step"], got["measured_step"]

    def matches(per_step: float) -> bool:
        return abs(per_step * steps - old_total) <= REL_TOL * old_total

    if not (old_total and steps):
        state = NO_COUNT
    else:
        state = REPRODUCED if matches(old) else ALREADY if matches(new) else MISMATCH
    return {
        "training": job["training"], "family": job["family"], "seed": job["seed"], "steps": steps,
        "stored_train_flops": old_total, "old_step": old, "new_step": new, "ratio": new / old,
        "counted_attention_step": got["counted_attention"], "state": state, "reproduced": state == REPRODUCED,
    }  # fmt: skip


def _refuse_if_already_allowed(folder: Path, line: dict[str, Any]) -> None:
    if line["state"] == ALREADY:
        raise ValueError(
            f"{folder}: run {line['training']} seed {line['seed']} already counts attention on allowed pairs "
            "(trained after the trainer did): nothing to recount"
        )


def recount_quick(folder: Path, runs_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The quick job's version: each family's first step, its checkpoint curve rescaled, and the parity
    ratios read off the curves again (``bench.quick_curves.parity_ratios``)."""
    from tqdm import tqdm

    from bench.quick_curves import parity_ratios

    q = json.loads((folder / "quick.json").read_text())
    base = QuickConfig.from_dict(q["config"])
    missing = [f for f in base.families if not ((q.get("curves") or {}).get(f))]
    if missing:
        raise ValueError(
            f"{folder}/quick.json: no checkpoint curve for {missing}, so no parity ratio to recount"
        )
    counts, curves = [], {}
    t0 = time.perf_counter()
    for fam in tqdm(base.families, desc="recount", unit="run", disable=not progress, file=sys.stderr):
        job = {
            "training": fam,
            "family": fam,
            "seed": base.seed,
            "quick": base.replace(families=(fam,)).to_dict(),
        }
        got = count_first_step(job, runs_dir / "runs" / fam, runs_dir / "cache")
        train = (q.get("train") or {}).get(fam) or {}
        counts.append(_count_line(job, got, train.get("train_flops"), train.get("steps")))
        _refuse_if_already_allowed(folder, counts[-1])
        scale = counts[-1]["ratio"]
        curves[fam] = {"points": [dict(pt, train_flops=pt["train_flops"] * scale) for pt in q["curves"][fam]]}
    ok = all(c["reproduced"] for c in counts)
    return {
        "study": str(folder),
        "groups": ["quick"],
        "counts": counts,
        "distinct_first_steps": len(counts),
        "parity_stored": {"quick": q.get("parity")},
        # a family whose stored count did not reproduce: no recounted ratio at all (it would mix counts)
        "parity_allowed_pairs": {"quick": parity_ratios(curves)} if ok else {},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def recount(study_dir: Path, runs_dir: Path, progress: bool = True) -> dict[str, Any]:
    """A study folder's recount (see the module doc); one-step runs and autoencoders go to ``runs_dir``."""
    from tqdm import tqdm

    study = json.loads((study_dir / "study.json").read_text())
    groups = parity_groups(study["config"]["groups"])
    if not groups:
        raise ValueError(
            f"{study_dir}/study.json: none of its groups {study['config']['groups']} has a parity ratio "
            f"(family ladders: {list(FAMILY_LADDERS)})"
        )
    cfg = study_config(study, groups)
    jobs = plan_jobs(cfg, runs_dir)
    stored = {(r["training"], r["seed"]): r for r in study["runs"] if r["group"] in groups}
    by_key: dict[str, dict[str, Any]] = {}
    counts: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for job in tqdm(jobs, desc="recount", unit="run", disable=not progress, file=sys.stderr):
        key = flops_key(job)
        if key not in by_key:
            run_dir = runs_dir / "runs" / f"{len(by_key):03d}_{job['training']}_seed{job['seed']}"
            by_key[key] = count_first_step(job, run_dir, runs_dir / "cache")
        line = stored.get((job["training"], job["seed"])) or {}
        counts.append(_count_line(job, by_key[key], line.get("train_flops"), line.get("steps")))
        _refuse_if_already_allowed(study_dir, counts[-1])
    ratio = {(c["training"], c["seed"]): c["ratio"] for c in counts if c["reproduced"]}
    lines = []
    for r in study["runs"]:
        r = dict(r)
        if r.get("train_flops") and (r["training"], r["seed"]) in ratio:  # every group's line of that run
            r["train_flops"] = r["train_flops"] * ratio[r["training"], r["seed"]]
        lines.append(r)
    all_rows = rows_for(tuple(study["config"]["groups"]))
    summary = summarize_rows(all_rows, lines)
    parity = {g: scaling_parity(summary, g) for g in groups if g in FAMILY_LADDERS}
    if len(lr_choice_rates(groups)) >= 2:
        parity[LR_CHOICE_GROUP] = lr_choice(summary, seeds=len(cfg.seeds), lines=lines)["parity"]
    ok = not any(c["state"] == MISMATCH for c in counts)  # (a failed run has no count, and no metrics)
    return {
        "study": str(study_dir),
        "groups": groups,
        "counts": counts,
        "distinct_first_steps": len(by_key),
        "parity_stored": {g: (study.get("parity") or {}).get(g) for g in parity},
        # a stored count that did not reproduce: no recounted ratios at all (they would mix counts)
        "parity_allowed_pairs": parity if ok else {},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _display(p: dict | None) -> str:
    if not p:
        return "-"
    return str(p.get("display", "-"))


def to_markdown(result: dict[str, Any]) -> str:
    from bench.quick_curves import CURVE_METRICS

    out = [
        f"# Training FLOPs recounted with attention on allowed pairs: `{result['study']}`",
        "",
        "Made by `python -m bench flops-recount`. Each run of the parity comparisons had its first "
        "training step rebuilt and counted twice: as the study counted it (FlopCounterMode through the "
        "sdpa backend: every L x L pair, flash backward) and as the trainer now counts it (without "
        "attention, plus attention on the layout's allowed pairs). `reproduced`: the old count times the "
        "run's steps equals the stored train_flops (other runs: their state, e.g. `no stored count` for a "
        "failed one).",
        "",
        "| training | seeds | old FLOPs / step | new FLOPs / step | new / old | reproduced |",
        "|---|---|---|---|---|---|",
    ]
    by_training: dict[str, list[dict[str, Any]]] = {}
    for c in result["counts"]:
        by_training.setdefault(c["training"], []).append(c)
    for training, cs in by_training.items():
        ratios = [c["ratio"] for c in cs]
        olds = [c["old_step"] for c in cs]
        news = [c["new_step"] for c in cs]
        cells = [f"{min(v):.4g} to {max(v):.4g}" for v in (olds, news)] + [
            f"{min(ratios):.3f} to {max(ratios):.3f}"
        ]
        others = sorted({c["state"] for c in cs if not c["reproduced"]})
        reproduced = f"{sum(c['reproduced'] for c in cs)} of {len(cs)}" + "".join(f"; {o}" for o in others)
        out.append(f"| {training} | {len(cs)} | {' | '.join(cells)} | {reproduced} |")
    out += ["", "## Parity FLOP ratios: as stored, and with the recounted FLOPs", ""]
    if not result["parity_allowed_pairs"]:
        mismatched = sum(c["state"] == MISMATCH for c in result["counts"])
        return "\n".join([*out, f"Not recounted: {mismatched} stored counts did not reproduce."]) + "\n"
    out += ["| group | metric | stored | allowed pairs |", "|---|---|---|---|"]
    for group, par in result["parity_allowed_pairs"].items():
        old = result["parity_stored"].get(group) or {}
        for metric in CURVE_METRICS:
            out.append(
                f"| {group} | {metric} | {_display(old.get(metric))} | {_display((par or {}).get(metric))} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench flops-recount",
        description=__doc__.split("\n\n")[0] + " Rebuilds one training step per (training, seed) of the "
        "study's parity ladders (of each family, for a quick job's folder); writes flops_recount.{json,md} "
        "and provenance into the folder.",
    )
    p.add_argument("study_dir", type=Path, help="a results folder holding study.json (bench study) or "
                   "quick.json (bench quick)")  # fmt: skip
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where the one-step runs and autoencoder caches go (default: a temporary folder, "
                        "removed afterwards)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    quick = (args.study_dir / "quick.json").is_file()
    if not quick and not (args.study_dir / "study.json").is_file():
        p.error(f"study_dir = {args.study_dir}: no study.json or quick.json there")
    with contextlib.ExitStack() as stack:
        runs = args.runs_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recount-")))
        try:
            result = (recount_quick if quick else recount)(
                args.study_dir, runs, progress=not args.no_progress
            )
        except (ValueError, OSError, json.JSONDecodeError) as e:
            print(f"flops-recount: {e}", file=sys.stderr)
            return 2
        except KeyError as e:  # a study.json or quick.json without a field the recount reads
            print(f"flops-recount: {args.study_dir}: its results file lacks the field {e}", file=sys.stderr)
            return 2
    out = args.study_dir
    atomic_write_json(out / "flops_recount.json", result)
    atomic_write_text(out / "flops_recount.md", to_markdown(result))
    prov = provenance("cpu", None, study_seeds=sorted({c["seed"] for c in result["counts"]}),
                      files=["flops_recount.json", "flops_recount.md"], wall_s=result["wall_s"])  # fmt: skip
    atomic_write_json(out / "flops_recount_provenance.json", prov)
    bad = [c for c in result["counts"] if c["state"] == MISMATCH]
    n, distinct = len(result["counts"]), result["distinct_first_steps"]
    reproduced = sum(c["reproduced"] for c in result["counts"])
    print(f"flops-recount: {n} runs, {distinct} distinct first steps, {reproduced} reproduced, "
          f"{len(bad)} mismatched; wrote {out}/flops_recount.md")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
