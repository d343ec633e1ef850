"""The study section of REPORT.md: KID and the paper's CLIP score, also for a study.csv from before them."""

from __future__ import annotations

import random
import statistics

from bench import study
from bench.quick import to_csv
from bench.study_grid import rows_for
from bench.study_report import study_section

# what an older study.csv held, of what matters here
KEEP = ("group", "label", "training", "family", "series", "n_seeds", "text_bpb_mean", "fid_mean",
        "paper_c4_ppl", "paper_cider", "paper_fid")  # fmt: skip


def _lines(rng: random.Random) -> list[dict]:
    rows = rows_for(("masking",))
    records = [
        {"training": t, "seed": s, "train": {"params": 1, "steps": 4, "train_flops": 1e9}, "errors": [],
         "eval_errors": {}, "evals": {"default": {"text_bpb": rng.random(), "fid": 10 * rng.random(),
                                                  "kid": rng.random() / 100}}}
        for t in dict.fromkeys(r.training for r in rows) for s in (0, 1, 2)
    ]  # fmt: skip
    return study.run_rows(rows, records, (0, 1, 2))


def test_kid_and_the_papers_clip_stand_in_the_tables_also_for_an_older_study_csv(tmp_path):
    rng = random.Random()
    lines = _lines(rng)
    summary = study.summarize_rows(rows_for(("masking",)), lines)
    for older in (False, True):
        rows = [{k: s[k] for k in KEEP} for s in summary] if older else summary
        (tmp_path / "study.csv").write_text(to_csv(rows, list(rows[0])))
        (tmp_path / "study_runs.csv").write_text(to_csv(lines, list(study.RUN_FIELDS)))
        text = "\n".join(study_section(tmp_path))
        assert "| KID |" in text and "| paper CLIP |" in text
        for label, clip in (("linear causal", "23"), ("U-Net bidirectional", "25.4")):
            kid = [ln["kid"] for ln in lines if ln["label"] == label]
            row = next(r for r in text.splitlines() if r.startswith(f"| {label} |"))
            cells = row.strip("|").split(" | ")
            assert f"{statistics.mean(kid):.3g} ± {statistics.stdev(kid):.2g}" in cells, (older, row)
            assert cells[-1].strip() == clip, row  # the paper's Table 5 CLIP score, the last column
