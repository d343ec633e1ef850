"""bench flops-recount: an old-style study's FLOPs rebuilt from one step per run, rescaled, parity redone."""

from __future__ import annotations

import json

import pytest

from bench import flops_recount, study
from bench.quick import QuickConfig, model_and_train_config, to_csv
from bench.study_grid import rows_for
from tests.tiny_quick import TINY_QUICK
from transfusion.train import train

STEPS = 3


def _old_style_study(tmp_path):
    """A study.json whose train_flops were counted the old way (the counter's attention, every pair), from
    runs trained here for STEPS steps; metrics made up, growing with the size so the ladder has a parity."""
    quick = {**TINY_QUICK, "curve_points": 1, "cache_dir": str(tmp_path / "cache")}
    quick["model_overrides"] = {"max_seq_len": 256}  # the ladder's sizes are its presets
    cfg = study.StudyConfig(groups=("scaling",), seeds=(0,), workers=1, quick=quick)
    jobs = {j["training"]: j for j in study.plan_jobs(cfg, tmp_path / "unused")}
    lines, flops = [], {}
    for i, row in enumerate(rows_for(("scaling",))):
        job = jobs[row.training]
        run = tmp_path / "old" / row.training
        qc = QuickConfig.from_dict(job["quick"]).replace(steps=STEPS)
        model_cfg, train_cfg = model_and_train_config(qc, job["family"], threads=1)
        train(model_cfg, train_cfg.replace(ckpt_every=0), run, preset=qc.preset)
        flops[row.training] = json.loads((run / "config.json").read_text())["flops"]
        line = {k: None for k in study.RUN_FIELDS}
        old_total = flops[row.training]["counted_step"] * STEPS
        line.update(group=row.group, label=row.label, training=row.training, family=job["family"], seed=0,
                    status="ok", steps=STEPS, train_flops=old_total, text_bpb=3.0 - 0.1 * i,
                    caption_accuracy=0.1 * i, t2i_alignment=0.1 * i, fid=30.0 - i)  # fmt: skip
        lines.append(line)
    summary = study.summarize_rows(rows_for(("scaling",)), lines)
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({
        "config": cfg.to_dict(), "runs": lines, "summary": summary,
        "parity": {"scaling": study.scaling_parity(summary, "scaling")},
    }))  # fmt: skip
    (out / "study.csv").write_text(to_csv(summary, list(summary[0])))
    return out, lines, flops


def test_an_old_study_is_reproduced_rescaled_and_its_parity_redone(tmp_path):
    out, lines, flops = _old_style_study(tmp_path)
    assert flops_recount.main([str(out), "--runs-dir", str(tmp_path / "recount"), "--no-progress"]) == 0
    res = json.loads((out / "flops_recount.json").read_text())
    assert len(res["counts"]) == len(lines) and all(c["reproduced"] for c in res["counts"])
    for c in res["counts"]:
        want = flops[c["training"]]  # the new count, as training with this code records it
        assert c["old_step"] == want["counted_step"] and c["new_step"] == want["measured_step"]
        assert c["ratio"] < 1  # attention on allowed pairs only: less than the counter saw
    # the parity, with the study's own functions on the FLOPs training now records
    new_lines = [dict(ln, train_flops=flops[ln["training"]]["measured_step"] * STEPS) for ln in lines]
    want = study.scaling_parity(study.summarize_rows(rows_for(("scaling",)), new_lines), "scaling")
    got = res["parity_allowed_pairs"]["scaling"]
    assert set(got) == set(want)
    for metric, par in want.items():  # (stored x new / old against new x steps: equal to rounding)
        assert got[metric]["display"] == par["display"] and got[metric]["ratio"] == pytest.approx(
            par["ratio"]
        )
    assert res["parity_allowed_pairs"]["scaling"] != res["parity_stored"]["scaling"]
    md = (out / "flops_recount.md").read_text()
    assert "| base | 1 |" in md and "1 of 1 |" in md
    assert json.loads((out / "flops_recount_provenance.json").read_text())["files"]
    # the report shows the recounted ratios beside the stored ones
    from bench.study_report import study_section

    report = "\n".join(study_section(out))
    assert f"reproduced {len(lines)} of {len(lines)} stored counts exactly" in report
    recounted = "; ".join(f"{m}: {p['display']}" for m, p in got.items() if p)
    assert f"With attention counted on allowed pairs only (`flops_recount.md`): {recounted}." in report

    # a stored count the rebuilt step does not reproduce is flagged and fails the command, and no ratio is
    # recounted (it would mix counts); a rerun into the same --runs-dir starts its one-step runs over
    data = json.loads((out / "study.json").read_text())
    data["runs"][0]["train_flops"] *= 1.01
    (out / "study.json").write_text(json.dumps(data))
    assert flops_recount.main([str(out), "--runs-dir", str(tmp_path / "recount"), "--no-progress"]) == 1
    res = json.loads((out / "flops_recount.json").read_text())
    assert [c["state"] for c in res["counts"]].count("mismatch") == 1 and res["parity_allowed_pairs"] == {}
    assert "Not recounted: 1 stored counts did not reproduce." in (out / "flops_recount.md").read_text()
    assert flops_recount.recounted_parity(out) == {}

    # a study trained with the new counting is refused: nothing to recount
    for line in data["runs"]:
        line["train_flops"] = flops[line["training"]]["measured_step"] * STEPS
    (out / "study.json").write_text(json.dumps(data))
    assert flops_recount.main([str(out), "--runs-dir", str(tmp_path / "recount"), "--no-progress"]) == 2


def test_a_study_without_a_ladder_or_fields_and_a_quick_job_without_curves_are_refused(tmp_path, capsys):
    config = {"groups": ["masking"], "seeds": [0], "quick": {}}
    (tmp_path / "study.json").write_text(json.dumps({"config": config, "runs": [], "parity": {}}))
    assert flops_recount.main([str(tmp_path), "--no-progress"]) == 2
    assert "has a parity ratio" in capsys.readouterr().err
    (tmp_path / "study.json").write_text(json.dumps({"config": {"groups": ["scaling"]}}))
    assert flops_recount.main([str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lacks the field 'quick'" in err and "Traceback" not in err
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "quick.json").write_text(json.dumps({"config": QuickConfig().to_dict(), "curves": {}}))
    assert flops_recount.main([str(quick), "--no-progress"]) == 2
    assert "no checkpoint curve for ['transfusion', 'discrete']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flops_recount.main([str(tmp_path / "nowhere")])
    assert "no study.json" in capsys.readouterr().err


def test_a_quick_folder_is_recounted_and_its_curves_parity_redone(tmp_path):
    from bench.quick_curves import parity_ratios
    from bench.report import build_report

    cfg = QuickConfig.from_dict({**TINY_QUICK, "cache_dir": str(tmp_path / "cache"), "steps": STEPS})
    flops, curves = {}, {}
    for i, fam in enumerate(cfg.families):
        model_cfg, train_cfg = model_and_train_config(cfg, fam, threads=1)
        run = tmp_path / "old" / fam
        train(model_cfg, train_cfg.replace(ckpt_every=0), run, preset=cfg.preset)
        flops[fam] = json.loads((run / "config.json").read_text())["flops"]
        curves[fam] = [  # made-up metrics on the old-style FLOPs axis
            {"step": s, "train_flops": flops[fam]["counted_step"] * s, "text_bpb": 3.0 - s / (1 + i),
             "caption_accuracy": 0.1 * s, "t2i_alignment": 0.1 * s * (1 + i), "fid": 30.0 - s}
            for s in range(1, STEPS + 1)
        ]  # fmt: skip
    folder = tmp_path / "results" / "quick"
    folder.mkdir(parents=True)
    old = parity_ratios({f: {"points": c} for f, c in curves.items()})
    (folder / "quick.json").write_text(json.dumps({
        "config": cfg.to_dict(), "curves": curves, "parity": old,
        "train": {f: {"steps": STEPS, "train_flops": c[-1]["train_flops"]} for f, c in curves.items()},
    }))  # fmt: skip
    (folder / "quick.csv").write_text(to_csv([{"family": f} for f in curves], ["family"]))  # for the report
    assert flops_recount.main([str(folder), "--runs-dir", str(tmp_path / "recount"), "--no-progress"]) == 0
    res = json.loads((folder / "flops_recount.json").read_text())
    assert [c["reproduced"] for c in res["counts"]] == [True, True]
    new = {f: {"points": [dict(p, train_flops=flops[f]["measured_step"] * p["step"]) for p in c]}
           for f, c in curves.items()}  # fmt: skip
    want, got = parity_ratios(new), res["parity_allowed_pairs"]["quick"]
    for metric, par in want.items():
        assert got[metric]["display"] == par["display"] and got[metric]["ratio"] == pytest.approx(
            par["ratio"]
        )
    assert got != old
    # the report's headline shows the recount, the quick section both
    report = build_report(tmp_path / "results").read_text()
    cells = " | ".join(got[m]["display"] for m in ("text_bpb", "caption_accuracy", "t2i_alignment", "fid"))
    assert "| quick job, checkpoint curves (quick; " in report and f"), recounted | {cells} |" in report
    listed = "; ".join(f"{m}: {p['display']}" for m, p in got.items() if p)
    assert f"recounted on the\nmask's allowed pairs (`flops_recount.md`): {listed}." in report
