"""bench.study: the grid, the statistics, the cross-size parity and a drastically reduced run end to end."""

import csv
import json
import math
import os
import statistics

import pytest

from bench import study
from bench.quick import QuickConfig, to_csv
from bench.quick_curves import CURVE_METRICS
from bench.study_grid import GROUPS, ROWS, TRAININGS, eval_key, rows_for
from tests.tiny_quick import TINY_QUICK

TINY = {**TINY_QUICK, "curve_points": 1}  # no checkpoint curves: the study does not draw them


def test_every_row_names_a_training_and_every_training_builds(tmp_path):
    assert {r.training for r in ROWS} == set(TRAININGS)  # no training is trained for nothing
    cfg = study.StudyConfig(groups=GROUPS, seeds=(3, 5))  # every group, extras too
    jobs = study.plan_jobs(cfg, tmp_path)
    keys = [(j["training"], j["seed"]) for j in jobs]
    assert len(keys) == len(set(keys)) == 2 * len(TRAININGS)
    assert [j["cost"] for j in jobs] == sorted((j["cost"] for j in jobs), reverse=True)
    from transfusion.config import get_preset

    for j in jobs:
        q = j["quick"]
        assert q["seed"] == j["seed"] and q["families"] == [j["family"]] and q["threads"] == 1
        model = get_preset(q["preset"], **q["model_overrides"])  # validates every override
        for k, v in TRAININGS[j["training"]].model.items():
            assert getattr(model, k) == v
        for k, v in TRAININGS[j["training"]].recipe.items():
            assert q[k] == v
        # each distinct evaluation of the training's rows, once
        wanted = {eval_key(study.eval_overrides(r, cfg.base())) for r in ROWS if r.training == j["training"]}
        assert set(j["evals"]) == wanted
    base = next(j for j in jobs if j["training"] == "base")
    assert set(base["evals"]) == {
        "default",
        "num_diffusion_steps=25",
        "num_diffusion_steps=50",
        "num_diffusion_steps=100",
        "num_diffusion_steps=500",
        "guidance_scale=1.0",
        "guidance_scale=5.0",
        # the x0-clip rows: 250 steps is the default, so that row shares the scaling_x0_clip evaluation
        "clip_sample_range=10.0",
        "clip_sample_range=10.0-num_diffusion_steps=50",
        "clip_sample_range=10.0-num_diffusion_steps=500",
        "caption_min_tokens=0",  # the dropped-caption group's free captions
        # the sampler-clip group: tighter DDPM clamps, and DDIM at 50 steps with and without them
        "clip_sample_range=5.0",
        "clip_sample_range=3.0",
        "num_diffusion_steps=50-scheduler=ddim",
        *(f"clip_sample_range={r}-num_diffusion_steps=50-scheduler=ddim" for r in (10.0, 5.0, 3.0)),
        # the same grid on the val split (sampler_choice_val)
        "eval_split=val",
        *(f"clip_sample_range={r}-eval_split=val" for r in (10.0, 5.0, 3.0)),
        "eval_split=val-num_diffusion_steps=50-scheduler=ddim",
        *(
            f"clip_sample_range={r}-eval_split=val-num_diffusion_steps=50-scheduler=ddim"
            for r in (10.0, 5.0, 3.0)
        ),
    }


def test_bad_study_settings_name_the_field():
    with pytest.raises(ValueError, match="nope"):
        study.StudyConfig(groups=("masking", "nope"))
    with pytest.raises(ValueError, match="seeds"):
        study.StudyConfig(seeds=(1, 1))
    with pytest.raises(ValueError, match="workers"):
        study.StudyConfig(workers=0)
    with pytest.raises(ValueError, match="n_tti"):
        study.StudyConfig(quick={"n_tti": 3})
    with pytest.raises(ValueError, match="seed"):
        study.StudyConfig(quick={"seed": 3})
    with pytest.raises(ValueError, match="adapter"):  # the masking rows vary it
        study.StudyConfig(groups=("masking",), quick={"model_overrides": {"adapter": "unet"}})
    study.StudyConfig(groups=("masking",), quick={"model_overrides": {"dim": 64}})  # no row varies the size
    with pytest.raises(ValueError, match=r"sets \['lr'\], which some of the study's trainings set"):
        study.StudyConfig(quick={"lr": 1e-4})  # the scaling_lr_3e-4 group's trainings set it
    study.StudyConfig(groups=("masking",), quick={"lr": 1e-4})


def _record(training, seed, bpb, fid, flops=1e9, errors=()):
    ev = {"text_bpb": bpb, "caption_accuracy": 0.5, "t2i_alignment": 0.25, "fid": fid, "kid": None}
    return {
        "training": training,
        "seed": seed,
        "train": {"params": 10, "steps": 4, "train_flops": flops},
        "evals": {"default": ev} if not errors else {},
        "eval_errors": {},
        "errors": list(errors),
        "reused": False,
    }


def test_rows_mean_and_sample_std_over_seeds_and_failures_counted():
    rows = rows_for(("lambda",))
    vals = {"lambda-1": [1.3, 1.7], "base": [0.9, 1.4], "lambda-20": [2.0, None]}
    records = []
    for training, (a, b) in vals.items():
        records.append(_record(training, 0, a, 10 * a))
        records.append(
            _record(training, 1, b, 10 * b) if b else _record(training, 1, 0, 0, errors=["train: boom"])
        )
    lines = study.run_rows(rows, records, (0, 1))
    assert len(lines) == 6
    summary = {s["label"]: s for s in study.summarize_rows(rows, lines)}
    for row in rows:
        s = summary[row.label]
        got = [v for v in vals[row.training] if v is not None]
        assert s["n_seeds"] == len(got)
        assert s["text_bpb_mean"] == pytest.approx(statistics.fmean(got))
        assert s["fid_mean"] == pytest.approx(10 * statistics.fmean(got))
        if len(got) > 1:
            assert s["text_bpb_std"] == pytest.approx(statistics.stdev(got))
        else:
            assert s["text_bpb_std"] is None
    failed = [ln for ln in lines if ln["status"] == "failed"]
    assert len(failed) == 1 and "boom" in failed[0]["error"] and failed[0]["training"] == "lambda-20"


def test_empty_caption_share():
    from bench.quick import empty_caption_share

    assert empty_caption_share(["a red circle", "", "  ", "two"]) == 0.5
    assert empty_caption_share([]) is None and empty_caption_share(None) is None


def test_a_failed_evaluation_fails_its_rows_only():
    rows = rows_for(("cfg_scale",))  # guidance 1 (off), 3 (the default evaluation), 5
    rec = _record("base", 0, 1.0, 20.0)
    rec["evals"]["guidance_scale=1.0"] = dict(rec["evals"]["default"])
    rec["eval_errors"]["guidance_scale=5.0"] = "eval guidance_scale=5.0: RuntimeError: boom"
    status = {ln["label"]: (ln["status"], ln["error"]) for ln in study.run_rows(rows, [rec], (0,))}
    assert status["guidance 1 (off)"] == ("ok", None) and status["guidance 3"] == ("ok", None)
    assert status["guidance 5"][0] == "failed" and "boom" in status["guidance 5"][1]
    del rec["evals"]["guidance_scale=1.0"]  # neither result nor error: not silently "ok"
    status = {ln["label"]: ln["status"] for ln in study.run_rows(rows, [rec], (0,))}
    assert status["guidance 1 (off)"] == "failed"


def test_scaling_parity_reads_across_sizes():
    def s(family, flops, bpb, group="scaling"):
        d = {"group": group, "family": family, "label": f"{family} {flops:g}", "train_flops_mean": flops}
        for m in CURVE_METRICS:
            d[f"{m}_mean"] = None
        d["text_bpb_mean"] = bpb
        return d

    summary = [
        s("transfusion", 1e9, 2.0),
        s("transfusion", 1e10, 1.0),
        s("discrete", 1e9, 2.5),
        s("discrete", 1e10, 1.5),
    ]
    par = study.scaling_parity(summary)
    # Transfusion's line in log-FLOPs crosses the largest baseline's 1.5 halfway: at sqrt(1e9 * 1e10) FLOPs
    assert par["text_bpb"]["kind"] == "exact"
    assert par["text_bpb"]["ratio"] == pytest.approx(math.sqrt(1e9 * 1e10) / 1e10)
    assert par["text_bpb"]["baseline"] == "discrete 1e+10"
    assert par["fid"] is None
    # each ladder group is read on its own rows
    other = study.scaling_parity(
        [s("transfusion", 1e9, 1.0, "x"), s("discrete", 1e10, 1.5, "x"), *summary], "x"
    )
    assert other["text_bpb"]["kind"] == "at_most" and other["text_bpb"]["ratio"] == pytest.approx(0.1)


def test_lr_choice_picks_each_size_rate_on_val_and_reads_the_test_rows():
    """Per metric, each family and size takes the learning rate with the better val mean (lower bits per
    byte, higher alignment), its test row comes from that rate's test ladder, and the chosen rows are
    read as one ladder for the parity ratio."""
    from bench.study_grid import EXTRA_GROUPS, LADDER_LRS, LR_CHOICE, SIZES, ladder_training

    flops = {size: 10.0 ** (9 + i) for i, size in enumerate(SIZES)}
    rng = __import__("random").Random(7)
    summary, val_bpb, test_bpb = [], {}, {}
    for family in ("transfusion", "discrete"):
        for size in SIZES:
            for lr, suffix in LADDER_LRS.items():
                training = ladder_training(family, size, suffix)
                val_bpb[training], test_bpb[training] = rng.uniform(1, 3), rng.uniform(1, 3)
                for group, bpb in zip(LR_CHOICE[lr], (val_bpb, test_bpb)):
                    row = {
                        "group": group,
                        "training": training,
                        "family": family,
                        "label": training,
                        "train_flops_mean": flops[size],
                        "n_seeds": 2,
                        **{f"{m}_mean": None for m in CURVE_METRICS},
                        **{f"{m}_n": 0 for m in CURVE_METRICS},
                        "text_bpb_n": 2,
                        "t2i_alignment_n": 2,
                    }
                    row["text_bpb_mean"] = bpb[training]
                    row["t2i_alignment_mean"] = -bpb[training]  # higher is better: the opposite choice
                    summary.append(row)  # fmt: skip
    got = study.lr_choice(summary)
    chosen = {(c["metric"], c["family"], c["size"]): c["lr"] for c in got["choices"]}
    picked = {}
    for family in ("transfusion", "discrete"):
        for size in SIZES:
            by_lr = {lr: ladder_training(family, size, sfx) for lr, sfx in LADDER_LRS.items()}
            best = min(by_lr, key=lambda lr: val_bpb[by_lr[lr]])
            assert chosen[("text_bpb", family, size)] == best
            assert chosen[("t2i_alignment", family, size)] == best  # -bpb, higher is better: the same
            picked[(family, size)] = test_bpb[by_lr[best]]
    assert not any(m == "fid" for m, _, _ in chosen)  # no val values: no choice
    # the parity ratio is the fixed-rate ladder's reading of the chosen test rows
    ladder = [
        {"group": "g", "family": f, "label": f"{f} {z}", "train_flops_mean": flops[z],
         **{f"{m}_mean": None for m in CURVE_METRICS}, "text_bpb_mean": picked[(f, z)]}
        for f in ("transfusion", "discrete") for z in SIZES
    ]  # fmt: skip
    want = study.scaling_parity(ladder, "g")["text_bpb"]
    assert got["parity"]["text_bpb"]["ratio"] == want["ratio"] and got["parity"]["fid"] is None
    # without the extra groups (the default grid) the choice is between the other two rates
    extra = set(EXTRA_GROUPS)
    two = study.lr_choice([r for r in summary if r["group"] not in extra])
    assert len(two["choices"]) == 2 * 2 * len(SIZES)  # two metrics hold values, two families
    for c in two["choices"]:
        rates = {lr: ladder_training(c["family"], c["size"], sfx) for lr, sfx in LADDER_LRS.items()}
        assert set(k for k in c if k.startswith("val_")) == {"val_1e-3", "val_3e-4"}
        assert c["lr"] == min(("1e-3", "3e-4"), key=lambda lr: val_bpb[rates[lr]])
    # a rate with a seed missing (failed or diverged) is no candidate, on val or on test
    best = chosen[("text_bpb", "transfusion", "tiny")]
    training = ladder_training("transfusion", "tiny", LADDER_LRS[best])
    for group in LR_CHOICE[best]:
        short = [
            dict(r, text_bpb_n=1) if (r["group"], r["training"]) == (group, training) else r for r in summary
        ]
        again = study.lr_choice(short, seeds=2)
        pick = next(
            c
            for c in again["choices"]
            if (c["metric"], c["family"], c["size"]) == ("text_bpb", "transfusion", "tiny")
        )
        assert pick["lr"] != best and f"val_{best}" not in pick
    assert study.lr_choice(summary, seeds=3)["choices"] == []  # every row short of the run's seeds


def test_paired_margin_matches_scipys_paired_t_test():
    """The chosen rate's lead over the runner-up is read seed by seed: against scipy's paired t-test on
    fresh numbers, for a lower-is-better and a higher-is-better metric, on the seeds both rates hold."""
    import random

    from scipy import stats

    rng = random.Random()
    for lower in (True, False):
        n = rng.randint(2, 6)
        best = {s: rng.gauss(10, 2) for s in range(n + 1)}  # seed n: only the chosen rate holds it
        other = {s: best[s] + (1 if lower else -1) * rng.gauss(0.5, 1) for s in range(n)} | {n + 7: 0.0}
        got = study.paired_margin(best, other, lower)
        a, b = [best[s] for s in range(n)], [other[s] for s in range(n)]
        leads = [y - x if lower else x - y for x, y in zip(a, b)]
        assert got["margin_n"] == n and got["margin"] == pytest.approx(statistics.fmean(leads))
        assert got["margin_se"] == pytest.approx(statistics.stdev(leads) / math.sqrt(n))
        assert got["margin_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert study.paired_margin({0: 1.0}, {0: 3.0}, True) == {
        "margin": 2.0, "margin_se": None, "margin_p": None, "margin_n": 1
    }  # fmt: skip
    same_lead = study.paired_margin({0: 1.0, 1: 2.0}, {0: 2.0, 1: 3.0}, True)
    assert same_lead["margin_se"] == 0 and same_lead["margin_p"] is None  # no spread: nothing to test
    assert study.paired_margin({0: 1.0}, {1: 3.0}, True)["margin"] is None  # no seed in common


def test_lr_choice_reads_each_choice_margin_from_the_seeds_val_rows():
    """With the per-seed lines, a choice names its runner-up (the second-best val mean of four rates, for
    a lower- and a higher-is-better metric) and the paired lead over it, read from the two rates' val
    rows of the same seeds (never from the test rows); the report bolds a steady lead, not a noisy one."""
    import random

    from bench.study_grid import LADDER_LRS, LR_CHOICE, SIZES, ladder_training
    from bench.study_report import _lr_choice_lines, _margin_cell, _with_margins

    rng = random.Random(11)
    steady, noisy = (2.0, 2.1, 1.9), (1.0, -0.8, 0.2)  # the runner-up's per-seed shortfall
    summary, lines, roles = [], [], {}
    for family in ("transfusion", "discrete"):
        for i, size in enumerate(SIZES):
            flops = 10.0 ** (9 + i)
            for metric, sign in (("fid", 1), ("t2i_alignment", -1)):  # lower, higher is better
                order = rng.sample(list(LADDER_LRS), len(LADDER_LRS))  # best, runner-up, two far behind
                lead = steady if (i + sign) % 2 else noisy
                roles[(family, size, metric)] = (order[0], order[1], lead)
                seed_effect = [rng.uniform(0, 5) for _ in range(3)]  # shared by a seed's models
                behind = {order[0]: (0, 0, 0), order[1]: lead, order[2]: (10,) * 3, order[3]: (20,) * 3}
                for lr in LADDER_LRS:
                    training = ladder_training(family, size, LADDER_LRS[lr])
                    val_group, test_group = LR_CHOICE[lr]
                    val = [50 + sign * (e + d) for e, d in zip(seed_effect, behind[lr])]
                    test = [50 - sign * (e + d) for e, d in zip(seed_effect, behind[lr])]  # the opposite
                    for group, values in ((val_group, val), (test_group, test)):
                        lines += [
                            {"group": group, "training": training, "seed": k, metric: v}
                            for k, v in enumerate(values)
                        ]
                        row = next(
                            (r for r in summary if (r["group"], r["training"]) == (group, training)), None
                        )
                        if row is None:
                            row = {"group": group, "training": training, "family": family, "label": training,
                                   "train_flops_mean": flops, "n_seeds": 3,
                                   **{f"{m}_mean": None for m in CURVE_METRICS},
                                   **{f"{m}_n": 0 for m in CURVE_METRICS}}  # fmt: skip
                            summary.append(row)
                        row.update({f"{metric}_mean": statistics.fmean(values), f"{metric}_n": 3})
    got = study.lr_choice(summary, seeds=3, lines=lines)
    assert len(got["choices"]) == 2 * 2 * len(SIZES)
    text = "\n".join(_lr_choice_lines(got))
    assert "How clearly" in text
    for c in got["choices"]:
        best, runner_up, lead = roles[(c["family"], c["size"], c["metric"])]
        assert (c["lr"], c["runner_up"]) == (best, runner_up), c
        assert c["margin"] == pytest.approx(statistics.fmean(lead)) and c["margin_n"] == 3
        assert c["margin_se"] == pytest.approx(statistics.stdev(lead) / math.sqrt(3))
        assert (c["margin_p"] < 0.05) == (lead == steady)
        cell = _margin_cell(c)
        assert cell.startswith("**") == (lead == steady) and f"(vs {runner_up})" in cell
        assert cell in text
    assert "runner_up" not in study.lr_choice(summary, seeds=3)["choices"][0]  # no lines, no margin
    # ties and a lead without spread say so
    assert _margin_cell({"margin": 0.0, "margin_se": 0.5, "margin_p": 1.0, "runner_up": "3e-4"}) == (
        "tie ± 0.5, p 1 (vs 3e-4)"
    )
    assert _margin_cell({"margin": 0.5, "margin_se": 0.0, "margin_p": None, "runner_up": "1e-2"}) == (
        "+0.5 ± 0, untested (vs 1e-2)"
    )
    # a study.json written before the margins gets them from its own runs; a choice the reading does not
    # reproduce keeps none
    stored = study.lr_choice(summary, seeds=3)
    stored["choices"][0] = dict(stored["choices"][0], lr="not a rate")
    info = {"config": {"seeds": [0, 1, 2]}, "summary": summary, "runs": lines, "lr_choice": stored}
    read = _with_margins(info)["choices"]
    assert "runner_up" not in read[0] and read[1:] == got["choices"][1:]
    assert _with_margins({**info, "runs": []}) == stored and _with_margins({}) is None


def test_chance_levels_are_read_over_the_items_each_metric_scores():
    """Alignment's chance level over the n_t2i prompts, captioning's over the n_caption images: with 96
    prompts and 64 captions, the caption reference is the 64-item one, the alignment one is not."""
    from bench.quick import reference_scores

    both = reference_scores(QuickConfig(eval_split="val", n_t2i=96, n_caption=64))
    at_64 = reference_scores(QuickConfig(eval_split="val"))
    at_96 = reference_scores(QuickConfig(eval_split="val", n_t2i=96, n_caption=96))
    assert (both["n"], both["n_caption"], at_64["n"]) == (96, 64, 64)
    assert both["shuffled_caption_accuracy"] == at_64["shuffled_caption_accuracy"]
    assert both["shuffled_t2i_alignment"] == at_96["shuffled_t2i_alignment"]
    assert both["shuffled_caption_accuracy"] != at_96["shuffled_caption_accuracy"]


def test_lr_choice_runs_when_at_least_two_rates_ran():
    assert study.lr_choice_rates(study.DEFAULT_GROUPS) == ["1e-3", "3e-4"]
    assert study.lr_choice_rates(GROUPS) == ["1e-3", "3e-4", "3e-3", "1e-2"]
    one_and_extra = ("lr_choice_val", "scaling_val_samplers", "lr_choice_val_3e-3", "scaling_lr_3e-3")
    assert study.lr_choice_rates(one_and_extra) == ["1e-3", "3e-3"]
    assert study.lr_choice_rates(("lr_choice_val", "scaling_lr_3e-3", "masking")) == []


def test_default_grid_leaves_out_the_extra_groups(capsys):
    """The extra groups (learning rates 3e-3 and 1e-2, Chameleon's stabilisers, the QK-norm baseline
    ladder) are outside the default grid and the default StudyConfig; `--groups all` adds them, with six
    trainings at each of those rates, four tiny ones with stabilisers and two larger QK-norm baselines."""
    from bench.study_grid import DEFAULT_GROUPS, EXTRA_GROUPS

    lr_groups = {"scaling_lr_3e-3", "lr_choice_val_3e-3", "scaling_lr_1e-2", "lr_choice_val_1e-2"}
    assert set(EXTRA_GROUPS) == lr_groups | {"stabilizers", "scaling_qk_norm"}
    assert set(DEFAULT_GROUPS) == set(GROUPS) - set(EXTRA_GROUPS)
    assert study.StudyConfig().groups == DEFAULT_GROUPS
    extra_trainings = {r.training for r in rows_for(EXTRA_GROUPS)} - {
        r.training for r in rows_for(DEFAULT_GROUPS)
    }
    lr_trainings = {r.training for r in rows_for(tuple(lr_groups))}
    extra_rates = sorted(TRAININGS[t].recipe["lr"] for t in lr_trainings)
    assert extra_rates == [3e-3] * 6 + [1e-2] * 6
    larger = {"discrete-small-qk-norm", "discrete-S-qk-norm"}  # the QK-norm ladder's (tiny: stabilizers')
    assert {TRAININGS[t].model.get("qk_norm") for t in larger} == {True} and larger <= extra_trainings
    stabilized = extra_trainings - lr_trainings - larger
    settings = {(TRAININGS[t].family, TRAININGS[t].model.get("qk_norm"), TRAININGS[t].model.get("z_loss"))
                for t in stabilized}  # fmt: skip
    want = {
        ("discrete", True, None),
        ("discrete", None, 1e-5),
        ("discrete", True, 1e-5),
        ("transfusion", True, 1e-5),
    }
    assert settings == want
    assert study.main(["--list"]) == 0
    default = capsys.readouterr().out
    assert study.main(["--list", "--groups", "all"]) == 0
    every = capsys.readouterr().out
    assert "lr 3e-3" not in default and "discrete S, lr 3e-3 (val)" in every
    assert "lr 1e-2" not in default and "transfusion tiny, lr 1e-2 (val)" in every
    assert study.main(["--list", "--groups", "masking,all"]) == 0  # 'all' anywhere in the list
    assert capsys.readouterr().out == every
    assert every.startswith(f"{2 * (int(default.split()[2].strip('(')) + 12 + 4 + 2)} jobs")


def test_study_end_to_end_then_reused(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    quick_cfg = {**TINY, "cache_dir": str(tmp_path / "cache")}
    cfg = study.StudyConfig(groups=("masking", "cfg_scale"), seeds=(0, 1), workers=2, quick=quick_cfg)
    out, runs = tmp_path / "out", tmp_path / "runs"
    res = study.run_study(out, cfg, runs, progress=False)
    assert "plots_error" not in res
    lines = res["runs"]
    assert len(lines) == 2 * (4 + 3)
    assert all(ln["status"] == "ok" for ln in lines), [ln["error"] for ln in lines]
    assert len(res["jobs"]) == 2 * 4  # base (shared by both groups), linear-causal, unet, unet-causal
    by = {(ln["label"], ln["seed"]): ln for ln in lines}
    for seed in (0, 1):
        base, guided_off = by[("linear bidirectional", seed)], by[("guidance 1 (off)", seed)]
        assert by[("guidance 3", seed)]["fid"] == base["fid"]  # the same training and evaluation
        assert guided_off["train_flops"] == base["train_flops"]  # the same training ...
        assert guided_off["fid"] != base["fid"]  # ... evaluated with different settings
    assert by[("linear bidirectional", 0)]["final_loss"] != by[("linear bidirectional", 1)]["final_loss"]
    for name in ("study.json", "study.csv", "study_runs.csv", "study_provenance.json"):
        assert (out / name).is_file()
    assert {p.name for p in (out / "plots").iterdir()} == {"study_masking.png", "study_cfg_scale.png"}
    with open(out / "study.csv") as f:
        summary = list(csv.DictReader(f))
    assert [r["label"] for r in summary] == [r.label for r in rows_for(("masking", "cfg_scale"))]
    assert float(summary[1]["paper_fid"]) > 0 and summary[-1]["paper_fid"] == ""
    prov = json.loads((out / "study_provenance.json").read_text())
    assert prov["seeds"] == [0, 1] and prov["profile"] == "study"
    from bench.report import build_report

    report = build_report(tmp_path).read_text()
    assert "study profile (out)" in report and "![study_masking](out/plots/study_masking.png)" in report
    bidir = summary[1]
    assert f"| linear bidirectional | 2 | {float(bidir['text_bpb_mean']):.3g} ± " in report

    # the study's base row is the quick profile's Transfusion row: same recipe, same machinery
    from bench import quick

    q = quick.run_quick(
        tmp_path / "quick",
        quick.QuickConfig.from_dict(
            {**quick_cfg, "families": ["transfusion"], "threads": 1, "progress": False}
        ),
        runs_dir=tmp_path / "quick_runs",
    )
    qrow = q["families"][0]
    for metric in ("text_bpb", "t2i_alignment", "caption_accuracy", "fid", "final_loss"):
        assert by[("linear bidirectional", 0)][metric] == pytest.approx(qrow[metric], rel=1e-6)

    again = study.run_study(out, cfg, runs, progress=False)
    assert all(j["reused"] for j in again["jobs"])
    assert [ln["fid"] for ln in again["runs"]] == [ln["fid"] for ln in lines]
    # what the jobs cost is read back from their stored results, not from the (fast) rerun
    cost = {(j["training"], j["seed"]): j["compute_s"] for j in res["jobs"]}
    assert all(c > 0 for c in cost.values())
    assert {(j["training"], j["seed"]): j["compute_s"] for j in again["jobs"]} == cost
    assert again["jobs_compute_s"] == pytest.approx(sum(cost.values()), abs=0.1)


def test_cli_lists_the_grid_and_rejects_bad_options(capsys):
    assert study.main(["--list", "--groups", "masking,patch"]) == 0
    text = capsys.readouterr().out
    assert "U-Net 8x8" in text and "linear causal" in text and "lambda" not in text
    for bad in (["--groups", "masking,nope"], ["--seeds", "a"], ["--workers", "0"], ["--set", "n_tti=3"]):
        with pytest.raises(SystemExit):
            study.main(["--list", *bad])
    assert "nope" in capsys.readouterr().err
    assert set(GROUPS) >= {"masking", "patch", "noise_limit", "scaling"}


def _worker_that_dies_on_linear_causal(job):
    if job["training"] == "linear-causal":
        os._exit(3)  # as a worker killed by the OOM killer would
    train = {"steps": 1}
    return {
        "training": job["training"],
        "seed": job["seed"],
        "train": train,
        "evals": {},
        "errors": [],
        "reused": False,
    }


def test_a_dead_worker_fails_its_jobs_not_the_study(tmp_path):
    jobs = study.plan_jobs(study.StudyConfig(groups=("masking",), seeds=(0,)), tmp_path)
    records = study.execute(jobs, workers=2, progress=False, worker=_worker_that_dies_on_linear_causal)
    assert sorted(r["training"] for r in records) == sorted(j["training"] for j in jobs)
    dead = next(r for r in records if r["training"] == "linear-causal")
    assert dead["errors"] and "BrokenProcessPool" in dead["errors"][0]
    assert any(not r["errors"] for r in records)  # the warm-up job finished before the death


def test_ladder_group_plots_against_flops_and_reports_them(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.study_plots import plot_study
    from bench.study_report import study_section

    rows = rows_for(("adapter_scaling",))
    records = [
        _record(t, seed, bpb=1.0 / (i + 1) + seed / 10, fid=50.0 - i, flops=10.0 ** (9 + i % 3))
        for i, t in enumerate(dict.fromkeys(r.training for r in rows))
        for seed in (0, 1)
    ]
    lines = study.run_rows(rows, records, (0, 1))
    summary = study.summarize_rows(rows, lines)
    assert {s["series"] for s in summary} == {"linear", "unet"}
    (png,) = plot_study(tmp_path, summary, lines)
    assert png.name == "study_adapter_scaling.png" and png.stat().st_size > 10_000
    (tmp_path / "study.csv").write_text(to_csv(summary, list(summary[0])))
    text = "\n".join(study_section(tmp_path))
    assert (
        "| row | seeds | train FLOPs | bits/byte | caption acc | empty caps |" in text and "paper FID" in text
    )
    linear_s = next(s for s in summary if s["label"].startswith("linear S"))
    assert f"| {linear_s['label']} | 2 | 1e+11 | {linear_s['text_bpb_mean']:.3g} ± " in text
    assert "Settings changed" not in text  # no study.json: nothing to name
    # a study run with --set says so once, above its tables; a default one says nothing
    for quick, line in (({}, None), ({"n_t2i": 256, "threads": 1}, "for every row: `n_t2i=256`.")):
        config = {"seeds": [0, 1], "quick": dict(QuickConfig().to_dict(), **quick)}
        (tmp_path / "study.json").write_text(json.dumps({"config": config}))
        text = "\n".join(study_section(tmp_path))
        assert text.count("Settings changed") == (line is not None)
        assert line is None or line in text.split("### ", 1)[0]


@pytest.mark.parametrize("extra", [False, True])
def test_report_puts_the_learning_rate_choice_after_its_last_val_group(tmp_path, extra):
    """The choice table follows lr_choice_val, or the last extra val group when the extra groups ran."""
    from bench.study_grid import LR_CHOICE
    from bench.study_report import study_section

    rates = tuple(LR_CHOICE) if extra else ("1e-3", "3e-4")
    groups = tuple(dict.fromkeys(LR_CHOICE[lr][0] for lr in rates))
    rows = rows_for(groups + tuple(LR_CHOICE[lr][1] for lr in rates))
    base = study.StudyConfig().base()
    records = []
    for i, t in enumerate(dict.fromkeys(r.training for r in rows)):
        for seed in (0, 1):
            rec = _record(t, seed, bpb=1.0 + i / 10, fid=20.0 - i, flops=10.0 ** (9 + i % 3))
            ev = rec["evals"]["default"]
            rec["evals"] = {eval_key(study.eval_overrides(r, base)): ev for r in rows if r.training == t}
            records.append(rec)
    summary = study.summarize_rows(rows, study.run_rows(rows, records, (0, 1), base))
    (tmp_path / "study.csv").write_text(to_csv(summary, list(summary[0])))
    chosen = study.lr_choice(summary)
    (tmp_path / "study.json").write_text(
        json.dumps({"lr_choice": chosen, "parity": {"lr_choice_val": chosen["parity"]}})
    )
    text = "\n".join(study_section(tmp_path))
    chosen = text.index("Chosen on val")
    headers = [text.index(f"### {study.GROUP_TITLES[g]}") for g in groups]
    assert text.count("Chosen on val") == 1 and all(h < chosen for h in headers)
    assert "### " not in text[headers[-1] + 4 : chosen]  # right after the last val group's table
    assert "Parity FLOP ratios read across" not in text  # the val groups' parity is the choice's


def test_one_worker_runs_in_process_each_familys_first_job_first(tmp_path):
    jobs = study.plan_jobs(study.StudyConfig(groups=("scaling",), seeds=(0,)), tmp_path)
    order = []

    def worker(job):
        order.append(job["training"])
        return {
            "training": job["training"],
            "seed": job["seed"],
            "train": {},
            "evals": {},
            "errors": [],
            "reused": False,
        }

    records = study.execute(jobs, workers=1, progress=False, worker=worker)
    firsts = {next(j["training"] for j in jobs if j["family"] == fam) for fam in ("transfusion", "discrete")}
    assert set(order[:2]) == firsts and sorted(order) == sorted(j["training"] for j in jobs)
    assert len(records) == len(jobs)


def test_report_lists_the_learning_rates_chosen_on_val():
    from bench.study_report import _lr_choice_lines

    choice = {
        "choices": [
            {"metric": "fid", "family": "transfusion", "size": "tiny", "lr": "1e-3"},
            {"metric": "fid", "family": "transfusion", "size": "S", "lr": "3e-4"},
            {"metric": "fid", "family": "discrete", "size": "S", "lr": "1e-3"},
            {"metric": "text_bpb", "family": "transfusion", "size": "tiny", "lr": "3e-4"},
        ],
        "parity": {"fid": {"display": "<= 0.144"}, "text_bpb": None},
    }
    text = "\n".join(_lr_choice_lines(choice))
    assert "| metric | transfusion tiny | transfusion S | discrete S | parity |" in text
    assert "| fid | 1e-3 | 3e-4 | 1e-3 | <= 0.144 |" in text
    assert "| text_bpb | 3e-4 | - | - | - |" in text
    assert _lr_choice_lines(None) == [] and _lr_choice_lines({"choices": []}) == []


def test_an_evaluation_has_one_folder_whichever_way_it_is_asked_for():
    """Folder names come from the effective evaluation settings, not from how --set and the row split
    them: a --set n_t2i must not land in the default folder (where it would replace the default
    evaluation), and a row naming the default steps shares the default folder under any --set."""
    from bench.quick import EVAL_FIELDS, eval_settings
    from bench.study_grid import Row

    plain, named = Row("g", "plain", "base"), Row("g", "250 steps", "base", eval={"num_diffusion_steps": 250})
    fifty = Row("g", "50 steps", "base", eval={"num_diffusion_steps": 50})

    def key(row: Row, **quick) -> str:
        return eval_key(study.eval_overrides(row, study.StudyConfig(quick=quick).base()))

    assert key(plain) == key(named) == "default" and key(fifty) == "num_diffusion_steps=50"
    assert key(plain, n_t2i=32) == key(named, n_t2i=32) == "n_t2i=32"
    assert (
        key(plain, num_diffusion_steps=50) == key(fifty) and key(named, num_diffusion_steps=50) == "default"
    )
    assert key(fifty, eval_seed=7) == "eval_seed=7-num_diffusion_steps=50"
    # threads, progress and training fields never name an evaluation folder
    assert eval_key(study.eval_overrides(plain, QuickConfig(threads=2, lr=3e-4, steps=10))) == "default"
    # every QuickConfig field is an evaluation field, a training field or one of the few that are neither,
    # so a new field cannot slip past the folder names and fingerprints unclassified
    from dataclasses import fields

    from bench.quick import _RUN_KEYS

    neither = {"families", "steps", "log_every", "cache_dir", "threads", "progress"}
    assert {f.name for f in fields(QuickConfig)} == {*EVAL_FIELDS, *_RUN_KEYS, *neither}
    assert not set(EVAL_FIELDS) & set(_RUN_KEYS)
    # (any file will do for the weights: only its presence is checked here)
    changed = QuickConfig(eval_split="val", baseline_guidance_scale=1.0, eval_seed=3, eval_offset=1,
                          fid_inception_weights=__file__)  # fmt: skip
    assert set(eval_settings(changed)) == {*EVAL_FIELDS, "seed", "dataset_options"}
