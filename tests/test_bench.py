"""Smoke tests of the benchmark plumbing (not timings): FLOP accounting, status recording, files."""

import json

import pandas as pd
import pytest
import torch

from bench.attention import MIN_REPS, SweepProfile, run_sweep, timing_reps
from bench.report import build_report
from bench.summary import summarize
from bench.workloads import benchmark_layout, document_spans


def test_document_spans_put_the_requested_share_in_images():
    docs, images = document_spans(4096, image_tokens=256, image_fraction=0.5, doc_tokens=1024)
    assert docs == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    assert sum(e - s for s, e in images) == 2048
    assert all(any(ds <= s and e <= de for ds, de in docs) for s, e in images)
    layout = benchmark_layout(2, 512, image_tokens=64, image_fraction=0.25)
    assert int((layout.modality == 1).sum()) == 2 * 128


def test_tiny_sweep_writes_rows_files_and_report(tmp_path):
    profile = SweepProfile(
        name="tiny",
        device="cpu",
        backends=["naive", "sdpa", "flex"],
        seq_lens=[64],
        head_dims=[16],
        dtypes=["float32"],
        image_tokens=[16],
        image_fractions=[0.5],
        heads=2,
        tokens_per_batch=128,
        warmup=1,
        reps=1,
        pivot_len=64,
    )
    out = tmp_path / "tiny"
    rows = run_sweep(profile, out)
    df = pd.read_csv(out / "attention.csv")
    assert len(df) == len(rows) == 8  # 3 backends + causal ceiling, two modes
    flex_bwd = df[(df.backend == "flex") & (df["mode"] == "fwd_bwd")].iloc[0]
    assert flex_bwd.status == "unsupported" and "no backward pass on cpu" in flex_bwd.error
    naive = df[(df.backend == "naive") & (df["mode"] == "fwd")].iloc[0]
    layout = benchmark_layout(2, 64, image_tokens=16, image_fraction=0.5)
    pairs = int(layout.allowed_pairs().sum())
    assert naive.allowed_pairs == pairs
    assert naive.gflop == pytest.approx(4 * 16 * pairs * 2 / 1e9)
    bwd = df[(df.backend == "naive") & (df["mode"] == "fwd_bwd")].iloc[0]
    assert bwd.gflop == pytest.approx(naive.gflop * 3.5)
    assert naive.tflops == pytest.approx(naive.gflop / 1e3 / (naive.ms * 1e-3))
    assert (
        df.device_ms.isna().all() and df.device_tflops.isna().all() and df.host_ms.isna().all()
    )  # CUDA only
    meta = json.loads((out / "attention_provenance.json").read_text())
    assert {"commit", "device", "torch", "command", "seed", "date"} <= set(meta)
    text = summarize(out, seq_len=64)
    assert "| flex |" in text and "fwd_bwd: unsupported" in text
    report = build_report(tmp_path)
    assert "Attention (tiny)" in report.read_text()
    assert (out / "plots" / "attention_tflops.png").stat().st_size > 1000


def _one_backend_profile(**kw) -> SweepProfile:
    return SweepProfile(
        name="one", device="cpu", backends=["naive"], seq_lens=[64], head_dims=[16], dtypes=["float32"],
        image_tokens=[16], image_fractions=[0.5], heads=2, tokens_per_batch=64, modes=("fwd",), warmup=2,
        reps=7, pivot_len=64, **kw,
    )  # fmt: skip


def test_timing_reps_cut_only_slow_configurations():
    assert timing_reps(1e6, _one_backend_profile()) == (2, 7)  # no timing budget: always the profile's
    profile = _one_backend_profile(timing_budget_ms=1000.0)
    assert timing_reps(1000.0 / 16 - 1e-6, profile) == (2, 7)  # 2 + 2 * 7 calls fit exactly
    for call_ms in (80.0, 100.0, 150.0):
        warmup, reps = timing_reps(call_ms, profile)
        assert warmup == 1 and MIN_REPS <= reps < 7 and 2 * reps * call_ms <= 1000.0
        assert 2 * (reps + 1) * call_ms > 1000.0  # as many as fit
    assert timing_reps(5000.0, profile) == (1, MIN_REPS)  # never fewer than MIN_REPS


def test_the_sweep_records_how_many_reps_each_configuration_got(tmp_path):
    rows = run_sweep(_one_backend_profile(), tmp_path / "all")
    assert [r["reps"] for r in rows] == [7, 7]  # naive and the causal ceiling
    rows = run_sweep(_one_backend_profile(timing_budget_ms=1e-6), tmp_path / "cut")
    assert [r["reps"] for r in rows] == [MIN_REPS, MIN_REPS]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)


def test_summary_lists_the_fastest_tuned_configs(tmp_path):
    """The summary's autotuning table picks the fastest pointer and TMA candidate per kernel at the
    headline length (a hand-made tuning log: this checks the table, not any timing)."""
    out = tmp_path / "res"
    out.mkdir()
    common = dict(head_dim=16, dtype="float32", image_tokens=16, image_fraction=0.5, seq_len=64, mode="fwd")
    pd.DataFrame([dict(common, backend="triton", status="ok", ms=1.0, tflops=1.0)]).to_csv(
        out / "attention.csv", index=False
    )
    (out / "attention_provenance.json").write_text(
        json.dumps(dict(device="x", torch="t", triton="tr", xformers=None, commit="c", date="d"))
    )
    rows = []
    for kernel in ("fwd", "dkdv", "dq"):
        for bm, tma, ms, chosen in ((64, False, 0.9, False), (128, False, 0.7, True), (64, True, 0.8, False)):
            rows.append(
                dict(kernel=kernel, head_dim=16, dtype="float32", q_bucket=64, kv_bucket=64, block_m=bm,
                     block_n=32, warps=4, stages=3, tma=tma, ms=ms, chosen=chosen)
            )  # fmt: skip
    rows.append(dict(rows[0], q_bucket=128, ms=0.1))  # another length: ignored
    rows.append(dict(rows[3], kernel="dkdv-atomic", dq_transposed=True))
    for scheme, ms in (("split", 2.5), ("atomic", 2.0)):
        rows.append(dict(kernel="backward", head_dim=16, dtype="float32", q_bucket=64, kv_bucket=64,
                         scheme=scheme, ms=ms, chosen=scheme == "atomic"))  # fmt: skip
    pd.DataFrame(rows).to_csv(out / "kernel_tuning.csv", index=False)
    pd.DataFrame(
        [dict(backend=name, mode="fwd_bwd", batch=batch, heads=heads, kernel=f"k{i}", calls_per_step=1.0,
              us_per_step=i * scale, share=i / 28, step_us=28.0 * scale)
         for name, scale, batch, heads in (("triton", 1.0, 4, 16), ("triton-natural", 1.25, 4, 16),
                                           ("triton-1row", 0.5, 1, 8), ("triton-natural-1row", 1.0, 1, 8),
                                           ("triton-split", 1.0, 4, 16), ("triton-atomic", 0.9, 4, 16))
         for i in range(1, 8)]
    ).to_csv(out / "kernel_breakdown.csv", index=False)  # fmt: skip
    text = summarize(out, seq_len=64)
    assert "| triton | 4 x 16 | 28 |" in text and "| triton-natural | 4 x 16 | 35 |" in text
    assert "triton (4 x 16): heaviest-first / natural launch order: 0.800" in text
    assert "triton-1row (1 x 8): heaviest-first / natural launch order: 0.500" in text
    assert "triton (4 x 16): atomic / split backward scheme: 0.900" in text
    assert "| fwd | 128x32 w4 s3 | 0.7 | 64x32 w4 s3 tma | 0.8 | 128x32 w4 s3 |" in text
    assert "| triton | `k7` | 7 | 25.0% | 1 |" in text and "`k1`" not in text  # the top 6 only
    assert text.count("128x32 w4 s3 | 0.7") == 3
    assert "| dkdv-atomic | 64x32 w4 s3 dqT | 0.9 | - | - | - |" in text
    assert "Backward scheme (auto): split 2.5 ms, atomic 2 ms; chosen: atomic." in text


def test_breakdown_profiles_each_backend_and_records_unsupported_ones(tmp_path):
    from bench.breakdown import run as run_breakdown

    rows = run_breakdown(
        tmp_path, ["naive", "flex"], "cpu", seq_len=64, head_dim=16, dtype=torch.float32, heads=2,
        tokens_per_batch=128, image_tokens=16, iters=2,
    )  # fmt: skip
    naive = [r for r in rows if r["backend"] == "naive"]
    assert naive and all(r["us_per_step"] > 0 for r in naive)
    assert sum(r["share"] for r in naive) <= 1.0 + 1e-9
    assert any("bmm" in r["kernel"] or "matmul" in r["kernel"] for r in naive)  # the naive backend's work
    flex = [r for r in rows if r["backend"] == "flex"]
    assert len(flex) == 1 and "unsupported" in flex[0]["kernel"]  # no flex backward on CPU
    df = pd.read_csv(tmp_path / "kernel_breakdown.csv")
    assert len(df) == len(rows)
    assert json.loads((tmp_path / "kernel_breakdown_provenance.json").read_text())["backends"] == [
        "naive",
        "flex",
    ]


def test_breakdown_natural_order_variant_runs_triton_in_natural_order():
    import importlib

    from bench.breakdown import VARIANTS, _variant_context

    ia = importlib.import_module("kernels.interval_attention")
    assert VARIANTS["triton-natural"].backend == VARIANTS["triton-1row"].backend == "triton"
    before = ia._ORDER
    for name in ("triton-natural", "triton-natural-1row"):
        with _variant_context(name):
            assert ia._ORDER == "natural"
    for name in ("triton", "triton-1row", "flex"):
        with _variant_context(name):
            assert ia._ORDER == before
    assert ia._ORDER == before
    default = ia._BACKWARD
    for name, mode in (("triton-split", "split"), ("triton-atomic", "atomic"), ("triton", default)):
        with _variant_context(name):
            assert ia._BACKWARD == mode and ia._ORDER == before
    assert ia._BACKWARD == default


def test_report_names_the_quick_settings_a_run_changed(tmp_path):
    from bench.quick import QuickConfig
    from bench.report import _quick_settings

    config = dict(QuickConfig().to_dict(), clip_sample_range=10.0, progress=False, num_diffusion_steps=50)
    (tmp_path / "quick.json").write_text(json.dumps({"config": config}))
    line = _quick_settings(tmp_path)[0]
    assert "`clip_sample_range=10.0`" in line and "`num_diffusion_steps=50`" in line
    assert "progress" not in line
    (tmp_path / "quick.json").write_text(json.dumps({"config": QuickConfig().to_dict()}))
    assert _quick_settings(tmp_path) == []
    assert _quick_settings(tmp_path / "missing") == []


def test_breakdown_runs_the_one_row_launch_order_variants(tmp_path):
    """The one-row variants profile triton on one row of 8 heads, in either launch order (CPU: the
    interpreter's operators), and the CSV records the batch and heads each row ran at."""
    pytest.importorskip("triton")
    from transfusion.attention import get_backend

    if missing := get_backend("triton").unavailable_reason():  # e.g. a Triton / NumPy pair it cannot run
        pytest.skip(missing)
    from bench.breakdown import run as run_breakdown

    rows = run_breakdown(
        tmp_path, ["triton-1row", "triton-natural-1row", "naive"], "cpu", seq_len=64, head_dim=32,
        dtype=torch.float32, heads=2, tokens_per_batch=128, image_tokens=16, iters=1,
    )  # fmt: skip
    df = pd.read_csv(tmp_path / "kernel_breakdown.csv")
    for name, (batch, heads) in (("triton-1row", (1, 8)), ("triton-natural-1row", (1, 8)), ("naive", (2, 2))):
        got = df[df.backend == name]
        assert not got.empty and (got.us_per_step > 0).all(), name
        assert (got.batch == batch).all() and (got.heads == heads).all(), name
    assert len(rows) == len(df)


def test_breakdown_keeps_the_backends_it_finished(tmp_path, monkeypatch):
    """The CSV is rewritten after every backend: a run cut short by the GPU script's time limit keeps the
    rows of the backends it finished (here the second backend never returns)."""
    import bench.breakdown as bd

    real = bd.kernel_breakdown

    def stop_at_sdpa(backends, **kwargs):
        if backends == ["sdpa"]:
            raise KeyboardInterrupt  # stands in for the timeout's kill
        return real(backends, **kwargs)

    monkeypatch.setattr(bd, "kernel_breakdown", stop_at_sdpa)
    with pytest.raises(KeyboardInterrupt):
        bd.run(tmp_path, ["naive", "sdpa"], "cpu", seq_len=64, head_dim=16, dtype=torch.float32, heads=2,
               tokens_per_batch=128, image_tokens=16, iters=1)  # fmt: skip
    df = pd.read_csv(tmp_path / "kernel_breakdown.csv")
    assert set(df.backend) == {"naive"} and (df.us_per_step > 0).all()
    meta = json.loads((tmp_path / "kernel_breakdown_provenance.json").read_text())
    assert meta["backends"] == ["naive", "sdpa"]


def test_report_headlines_every_parity_ratio(tmp_path):
    """The report opens with one row per comparison that has parity ratios (quick folders, study
    ladders in the grid's order), beside the paper's Table 3, all read from the files."""
    from bench.quick import QuickConfig
    from bench.report import PAPER_PARITY, build_report

    def parity(**display):
        return {m: {"display": d} for m, d in display.items()}

    quick_dir, study_dir = tmp_path / "quick_alt", tmp_path / "study"
    quick_dir.mkdir()
    study_dir.mkdir()
    config = dict(QuickConfig().to_dict(), scheduler="ddim")
    (quick_dir / "quick.json").write_text(
        json.dumps({"config": config, "parity": parity(text_bpb="0.5", fid="<= 0.2")})
    )
    ladders = {"scaling_x0_clip": parity(fid="> 0.9"), "scaling": parity(fid="0.7", caption_accuracy="0.3")}
    (study_dir / "study.json").write_text(json.dumps({"parity": ladders}))
    # a second study sharing a group (more seeds) gets its own row, named by its folder and seed count
    more_seeds = tmp_path / "study_more_seeds"
    more_seeds.mkdir()
    # ... and names the settings it changed for every row (a study run with --set n_t2i=256)
    more_images = dict(QuickConfig().to_dict(), n_t2i=256, progress=False)
    (more_seeds / "study.json").write_text(
        json.dumps(
            {"config": {"seeds": [0, 1, 2], "quick": more_images}, "parity": {"scaling": parity(fid="0.6")}}
        )
    )
    text = build_report(tmp_path).read_text()
    head = text.split("## Headlines: parity FLOP ratios", 1)[1].split("\n## ", 1)[0]
    assert f"| {PAPER_PARITY['text_bpb']:g} | {PAPER_PARITY['caption_accuracy']:g} |" in head
    assert '(quick_alt; `scheduler="ddim"`) | 0.5 | - | - | <= 0.2 |' in head
    assert head.index("`scaling`") < head.index("`scaling_x0_clip`")  # the grid's order
    assert (
        "`scaling` (study): Transfusion vs the discrete baseline" in head and "| - | 0.3 | - | 0.7 |" in head
    )
    assert "`scaling` (study_more_seeds, 3 seeds; `n_t2i=256`): Transfusion" in head
    assert "| - | - | - | 0.6 |" in head and "progress" not in head


def test_report_table_of_an_older_quick_csv_shows_missing_columns_as_dashes(tmp_path):
    """A quick.csv written before a column existed (or a family without parity values) still renders."""
    from bench.report import _csv_table

    path = tmp_path / "quick.csv"
    pd.DataFrame([dict(family="transfusion", fid=32.1), dict(family="discrete", fid=None)]).to_csv(
        path, index=False
    )
    table = _csv_table(path, ["family", "fid", "latent_std_ratio"])
    assert "| transfusion | 32.1 | - |" in table and "| discrete | - | - |" in table


def test_summary_of_a_folder_without_a_sweep_says_so(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "bench", "summary", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "no attention.csv" in done.stderr and "Traceback" not in done.stderr


def _kc_row(index, mode, status="pass", dkdv="32x128 w8 s3", dq="128x64 w8 s3", fwd="128x64 w8 s3", **errs):
    """A kernel-check CSV row at D = 16, float32; ``errs`` overrides e.g. dq_err, dq_nan."""
    row = dict(layout="mixed", batch=2, heads=2, seq_len=1100, head_dim=16, dtype="float32", tma="off",
               index=index, mode=mode, status=status, fwd_config=fwd, dkdv_config=dkdv,
               dq_config=dq if mode == "split" else "atomic", tolerance=0.02, error="")  # fmt: skip
    for name in ("out", "dq", "dk", "dv"):
        row[f"{name}_nan"], row[f"{name}_err"] = 0, 0.002
    if status in ("crashed", "error"):  # as the checker writes them: no numbers, maybe planned configs
        row.update({f"{n}_{x}": "" for n in ("out", "dq", "dk", "dv") for x in ("nan", "err")})
        row["error"] = "RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered"
    return {**row, **errs}


def _sweep_folder(out, scheme, checks, device=False, tuning=True, untimed=(), asked=False, shapes=None):
    """A results folder with triton and flex at L = 64 (D = 16, float32), the autotuner's choices (none
    for the ``untimed`` kernels, as for a lone candidate; no log at all without ``tuning``), the given
    kernel-check rows, and a provenance saying whether the sweep ran --kernel-check (``asked``) and, when
    ``shapes`` is given, at which shapes (else the record predates that list: the pivot shape)."""
    out.mkdir()
    common = dict(head_dim=16, dtype="float32", image_tokens=16, image_fraction=0.5, seq_len=64, heads=2,
                  status="ok", peak_mem_mb=1.0)  # fmt: skip
    rows = [dict(common, backend=b, mode=m, ms=ms, tflops=1.0)
            for b, m, ms in (("triton", "fwd", 1.0), ("flex", "fwd", 1.2), ("triton", "fwd_bwd", 3.0),
                             ("flex", "fwd_bwd", 3.6))]  # fmt: skip
    if device:
        rows = [dict(r, device_ms=r["ms"] * 0.9, device_tflops=1.1, host_ms=0.1) for r in rows]
    pd.DataFrame(rows).to_csv(out / "attention.csv", index=False)
    profile = dict(pivot_len=64, head_dims=[16], dtypes=["float32"])
    (out / "attention_provenance.json").write_text(
        json.dumps(dict(device="x", torch="t", triton="tr", xformers=None, commit="c", date="d",
                        profile=profile, kernel_check=asked,
                        **({} if shapes is None else {"kernel_check_shapes": shapes})))
    )  # fmt: skip
    tune = dict(head_dim=16, dtype="float32", q_bucket=64, kv_bucket=64, block_n=128, warps=8, stages=3,
                tma=False, ms=1.0, chosen=True)  # fmt: skip
    log = [dict(tune, kernel="fwd", block_m=128, block_n=64), dict(tune, kernel="dkdv", block_m=32),
           dict(tune, kernel="dq", block_m=128, block_n=64), dict(tune, kernel="dkdv-atomic", block_m=32,
                                                                  dq_transposed=True)]  # fmt: skip
    log = [r for r in log if r["kernel"] not in untimed]
    log += [dict(kernel="backward", head_dim=16, dtype="float32", q_bucket=64, kv_bucket=64, scheme=s,
                 ms=2.0, chosen=s == scheme) for s in ("split", "atomic")]  # fmt: skip
    if tuning:
        pd.DataFrame(log).to_csv(out / "kernel_tuning.csv", index=False)
    if checks:
        pd.DataFrame(checks).to_csv(out / "kernel_check_mixed.csv", index=False)
    return out


# The sweep's autotuned choices in _sweep_folder: fwd 128x64 w8 s3, dkdv 32x128 w8 s3, dq 128x64 w8 s3,
# dkdv-atomic 32x128 w8 s3 dqT.
SUMMARY_CASES = {
    "atomic dq wrong, atomic chosen": (
        "atomic", [_kc_row(0, "split"), _kc_row(1, "atomic", "fail", dkdv="32x128 w8 s3 dqT", dq_err=11.0)],
        {"fwd_bwd": "ran dkdv-atomic 32x128 w8 s3 dqT, wrong in kernel-check"},
    ),
    "atomic dq wrong, split chosen": (
        "split", [_kc_row(0, "split"), _kc_row(1, "atomic", "fail", dkdv="32x128 w8 s3 dqT", dq_err=11.0)],
        {},
    ),
    "a wrong output points to the forward": (
        "split", [_kc_row(0, "split", "fail", out_nan=3, dq_err=5.0)],
        {"fwd": "ran fwd 128x64 w8 s3, wrong in kernel-check",
         "fwd_bwd": "ran fwd 128x64 w8 s3, wrong in kernel-check"},
    ),
    "wrong at another head dim counts not": (
        "atomic", [_kc_row(1, "atomic", "fail", dkdv="32x128 w8 s3 dqT", dq_err=11.0, head_dim=64)], {},
    ),
    "a crashed pinned pair's configs, less those that passed elsewhere": (
        "atomic", [_kc_row(0, "split"), _kc_row(2, "atomic", "crashed", dkdv="32x128 w8 s3 dqT")],
        {"fwd_bwd": "ran dkdv-atomic 32x128 w8 s3 dqT, wrong in kernel-check"},
    ),
    "a crash that names no config": (
        "atomic", [_kc_row(0, "split"), _kc_row(2, "atomic", "crashed", dkdv="", fwd="", dq="")], {},
    ),
    "the autotuned check at this shape crashed": (
        "split", [_kc_row("autotuned", "split", "crashed", dkdv="", fwd="", dq="", seq_len=64)],
        {"fwd": "the check of its autotuned configs did not clear it (split crashed)",
         "fwd_bwd": "the check of its autotuned configs did not clear it (split crashed)"},
    ),
    "split crashed, atomic chosen and never checked": (
        "atomic", [_kc_row("autotuned", "split", "crashed", dkdv="", fwd="", dq="", seq_len=64)],
        {"fwd": "the check of its autotuned configs did not clear it (split crashed)",
         "fwd_bwd": "the check of its autotuned configs did not clear it (split crashed)"},
    ),
    "autotuned atomic dq wrong, its lone config never timed": (
        "atomic", [_kc_row("autotuned", "split", seq_len=64),
                   _kc_row("autotuned", "atomic", "fail", dkdv="32x128 w8 s3", dq_err=3.0, seq_len=64)],
        {"fwd_bwd": "the check of its autotuned configs did not clear it (split pass, atomic fail)"},
        dict(untimed=("dkdv-atomic",)),
    ),
    "a right output clears the forward": (
        "split", [_kc_row("autotuned", "atomic", "fail", dkdv="32x128 w8 s3", dq_err=3.0, seq_len=64)],
        {"fwd_bwd": "the check of its autotuned configs did not clear it (atomic fail)"},
    ),
    "no tuning log": (
        "split", [_kc_row("autotuned", "split", "crashed", dkdv="", fwd="", dq="", seq_len=64)],
        {"fwd": "the check of its autotuned configs did not clear it (split crashed)",
         "fwd_bwd": "the check of its autotuned configs did not clear it (split crashed)"},
        dict(tuning=False),
    ),
    "the sweep asked for the check and none is there": (
        "split", [], {"fwd": "the check of its autotuned configs is missing",
                      "fwd_bwd": "the check of its autotuned configs is missing"}, dict(asked=True),
    ),
    "the sweep asked and the check passed": (
        "split", [_kc_row("autotuned", "split", seq_len=64), _kc_row("autotuned", "atomic", seq_len=64)], {},
        dict(asked=True),
    ),
    "the sweep listed this shape and no check is there": (
        "split", [], {"fwd": "the check of its autotuned configs is missing",
                      "fwd_bwd": "the check of its autotuned configs is missing"},
        dict(asked=True, shapes=[dict(seq_len=64, head_dim=16, dtype="bfloat16"),
                                 dict(seq_len=64, head_dim=16, dtype="float32")]),
    ),
    "the sweep listed only other shapes": (
        "split", [], {}, dict(asked=True, shapes=[dict(seq_len=64, head_dim=16, dtype="bfloat16")]),
    ),
    "wrong at another dtype counts not": (
        "atomic", [_kc_row(1, "atomic", "fail", dkdv="32x128 w8 s3 dqT", dq_err=11.0, dtype="bfloat16")], {},
    ),
    "an autotuned check at another length counts not": (
        "split", [_kc_row("autotuned", "split", "crashed", dkdv="", fwd="", dq="", seq_len=128)], {},
    ),
    "the autotuned check of the other scheme crashed": (
        "split", [_kc_row("autotuned", "split", seq_len=64),
                  _kc_row("autotuned", "atomic", "crashed", dkdv="", fwd="", dq="", seq_len=64)], {},
    ),
    "the autotuned check of the other scheme failed": (
        "split", [_kc_row("autotuned", "split", seq_len=64),
                  _kc_row("autotuned", "atomic", "fail", dkdv="32x128 w8 s3", dq_err=3.0, seq_len=64)], {},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SUMMARY_CASES)
def test_summary_leaves_out_timings_that_cannot_stand(tmp_path, case):
    """A triton timing whose autotuned config a kernel-check found wrong (at the same dtype and head dim),
    or whose autotuned check at this shape did not pass, is marked INVALID, left out of the goals and
    dropped from the plots; other failures leave it alone."""
    from bench.plots import _base, drop_invalid
    from bench.summary import invalid_triton_modes

    scheme, checks, want, *options = SUMMARY_CASES[case]
    out = _sweep_folder(tmp_path / "res", scheme, checks, **(options[0] if options else {}))
    assert invalid_triton_modes(out, 16, "float32", 64) == want
    text = summarize(out, seq_len=64)
    for mode, why in want.items():
        assert f"{mode}: INVALID, {why}" in text
    assert ("| triton fwd speed / flex | 1.20 |" in text) == ("fwd" not in want)
    assert ("| triton fwd+bwd speed / flex | 1.20 |" in text) == ("fwd_bwd" not in want)
    plotted = drop_invalid(_base(pd.read_csv(out / "attention.csv")), out)
    assert sorted(plotted[plotted.backend == "triton"]["mode"]) == sorted({"fwd", "fwd_bwd"} - set(want))


def test_summary_table_of_the_one_axis_variations(tmp_path):
    """At the pivot length, each variation's rows by backend, with the speed against flex's under the
    same variation; a variation the budget skipped is one line; a triton timing says whether the check of
    its autotuned configs at that head dim and dtype passed."""
    schemes = ("split", "atomic")
    checks = [_kc_row("autotuned", mode, seq_len=64, head_dim=d) for d in (32, 16) for mode in schemes]
    out = _sweep_folder(tmp_path / "res", "split", checks[:2])
    df = pd.read_csv(out / "attention.csv")
    d32 = df.assign(head_dim=32, ms=df.ms / 2)  # triton 0.5 / 1.5 ms, flex 0.6 / 1.8 ms
    fp16 = df.assign(dtype="float16", status="skipped", error="time budget 9 s spent", ms=float("nan"))
    images = df.assign(image_tokens=32)
    pd.concat([df, d32, fp16, images]).to_csv(out / "attention.csv", index=False)
    images_row = "| images of 32 tokens | triton | 1 | 3 | 1.20 | 1.20 | autotuned configs "
    assert images_row + "not checked here |" in summarize(out, seq_len=64)
    pd.DataFrame(checks).to_csv(out / "kernel_check_mixed.csv", index=False)
    text = summarize(out, seq_len=64)
    assert images_row + "checked on the pivot's layout |" in text
    assert "| D = 32 | triton | 0.5 | 1.5 | 1.20 | 1.20 | autotuned configs checked |" in text
    assert "| D = 32 | flex | 0.6 | 1.8 | 1.00 | 1.00 | ok |" in text
    assert "| float16 | all | - | - | - | - | skipped (time budget 9 s spent) |" in text
    assert "| none |" not in text  # the headline is at the pivot length: no repeat of it
    # the scheme the sweep did not time failed there: the timing stands, and the row says so
    checks = checks[:2]
    checks[1] = _kc_row("autotuned", "atomic", "fail", seq_len=64, head_dim=32, dq_err=3.0)
    split = _sweep_folder(tmp_path / "split", "split", checks)  # the tuning log says split ran at D = 32
    tuning = pd.read_csv(split / "kernel_tuning.csv")
    pd.concat([tuning, tuning.assign(head_dim=32)]).to_csv(split / "kernel_tuning.csv", index=False)
    pd.concat([df, d32]).to_csv(split / "attention.csv", index=False)
    row = "| D = 32 | triton | 0.5 | 1.5 | 1.20 | 1.20 | autotuned configs checked: split pass, atomic fail |"
    assert row in summarize(split, seq_len=64)
    # a failed autotuned check there: INVALID, no speed
    checks[1] = _kc_row("autotuned", "atomic", "fail", seq_len=64, head_dim=32, dq_err=3.0)
    pd.DataFrame(checks).to_csv(out / "kernel_check_mixed.csv", index=False)
    text = summarize(out, seq_len=64)
    assert "| D = 32 | triton | 0.5 | 1.5 | 1.20 | - | fwd_bwd: INVALID, the check of its autotuned" in text


def test_summary_tables_of_the_checks(tmp_path):
    checks = [_kc_row(0, "split"), _kc_row(0, "atomic"),
              _kc_row(1, "atomic", "fail", dkdv="32x128 w8 s3 dqT", dq_err=11.0),
              _kc_row(2, "split", "fail", dq="64x64 w4 s3", dq_err=float("inf"), dq_nan=5),
              _kc_row(2, "atomic", "crashed", dkdv="")]  # fmt: skip
    out = _sweep_folder(tmp_path / "res", "atomic", checks, device=True)
    text = summarize(out, seq_len=64)
    assert "| kernel_check_mixed.csv | mixed 2 x 2 x 1100 | off | 5 | 2 |" in text
    assert (
        "| kernel_check_mixed.csv | 1 | atomic | fail | 32x128 w8 s3 dqT | dkdv-atomic 32x128 w8 s3 dqT |"
        in text
    )
    assert "| kernel_check_mixed.csv | 2 | split | fail | 32x128 w8 s3 | dq 64x64 w4 s3 |" in text
    assert (
        "| kernel_check_mixed.csv | 2 | atomic | crashed | - |  | RuntimeError: Triton Error [CUDA]" in text
    )
    assert "| triton | 0.9 | 0.1 | 2.7 (INVALID) | 0.1 |" in text  # the device-time table marks it too
    from bench.kernel_check import exclusions, read_checks

    assert exclusions(read_checks(out)) == "dkdv-atomic,float32,16,32x128 w8 s3 dqT;dq,float32,16,64x64 w4 s3"


def test_summary_sets_device_time_beside_wall_time(tmp_path):
    """With device_ms in the CSV the goals are read both ways, each from its own columns."""
    out = tmp_path / "res"
    out.mkdir()
    common = dict(head_dim=16, dtype="float32", image_tokens=16, image_fraction=0.5, seq_len=64, heads=2,
                  status="ok", peak_mem_mb=1.0, gflop=100.0)  # fmt: skip
    timings = {("triton", "fwd"): (1.3, 1.0), ("flex", "fwd"): (1.2, 1.1), ("triton", "fwd_bwd"): (4.0, 3.8),
               ("flex", "fwd_bwd"): (3.9, float("nan"))}  # fmt: skip
    pd.DataFrame(
        [dict(common, backend=b, mode=m, ms=w, tflops=100.0 / w, device_ms=d, device_tflops=100.0 / d,
              host_ms=0.2) for (b, m), (w, d) in timings.items()]
    ).to_csv(out / "attention.csv", index=False)  # fmt: skip
    (out / "attention_provenance.json").write_text(
        json.dumps(dict(device="x", torch="t", triton="tr", xformers=None, commit="c", date="d",
                        matmul_peak_tflops={"float32": 200.0}))
    )  # fmt: skip
    text = summarize(out, seq_len=64)
    assert "| triton | 1 | 0.2 | 3.8 | 0.2 |" in text and "| flex | 1.1 | 0.2 | - | 0.2 |" in text
    assert "| triton fwd speed / flex | 0.92 | 1.10 | 1.10 | no / yes |" in text
    assert "| triton fwd+bwd speed / flex | 0.97 | - | 1.00 | no / - |" in text
    assert "| triton fwd TFLOP/s / matmul peak | 0.38 | 0.50 | 0.60 | no / no |" in text
