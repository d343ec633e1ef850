"""Smoke tests of the benchmark plumbing (not timings): FLOP accounting, status recording, files."""

import json

import pandas as pd
import pytest

from bench.attention import SweepProfile, run_sweep
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
    meta = json.loads((out / "attention_provenance.json").read_text())
    assert {"commit", "device", "torch", "command", "seed", "date"} <= set(meta)
    text = summarize(out, seq_len=64)
    assert "| flex |" in text and "fwd_bwd: unsupported" in text
    report = build_report(tmp_path)
    assert "Attention (tiny)" in report.read_text()
    assert (out / "plots" / "attention_tflops.png").stat().st_size > 1000
