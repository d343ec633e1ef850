"""The CPU peak-memory measurement of the attention sweep (bench.attention.cpu_peak_bytes), checked against
allocations of known size, and the sweep's peak_mem_mb column against the naive backend's L x L scores."""

import json
import warnings

import pandas as pd
import pytest
import torch

from bench.attention import SweepProfile, cpu_peak_bytes, run_sweep

N, M = 3 * 2**20, 5 * 2**20  # bytes
SLACK = 64 * 2**10  # allocator rounding and the odd small temporary


def _bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def test_peak_counts_tensors_alive_at_the_same_time():
    def both_alive():
        a = _bytes(N)
        b = _bytes(M)
        del a, b

    assert N + M <= cpu_peak_bytes(both_alive) <= N + M + SLACK


def test_peak_of_tensors_alive_one_after_the_other_is_the_largest():
    def one_at_a_time():
        a = _bytes(M)
        del a
        b = _bytes(N)
        del b

    assert M <= cpu_peak_bytes(one_at_a_time) <= M + SLACK


def test_peak_is_relative_to_what_was_allocated_before_the_call():
    held = [_bytes(4 * M)]  # allocated before: neither counted nor, freed during the call, subtracted

    def free_then_allocate():
        held.clear()
        b = _bytes(N)
        del b

    assert N <= cpu_peak_bytes(free_then_allocate) <= N + SLACK


def test_cpu_sweep_records_peak_memory_growing_with_length(tmp_path):
    heads, tokens = 2, 256
    profile = SweepProfile(
        name="mem", device="cpu", backends=["naive", "sdpa"], seq_lens=[64, 128, 256], head_dims=[16],
        dtypes=["float32"], image_tokens=[16], image_fractions=[0.5], heads=heads, tokens_per_batch=tokens,
        warmup=1, reps=1, pivot_len=64,
    )  # fmt: skip
    df = pd.DataFrame(run_sweep(profile, tmp_path))
    ok = df[df.status == "ok"]
    assert len(ok) == len(df) == 3 * 3 * 2  # naive, sdpa and the causal ceiling; both modes
    assert (ok.peak_mem_mb > 0).all()
    for mode in ("fwd", "fwd_bwd"):
        naive = ok[(ok.backend == "naive") & (ok["mode"] == mode)].sort_values("seq_len")
        assert naive.peak_mem_mb.is_monotonic_increasing and naive.peak_mem_mb.is_unique
        # naive materializes the (B, H, L, L) float32 scores: batch * L = tokens, so they grow as L
        scores_mb = naive.batch * heads * naive.seq_len**2 * 4 / 2**20
        assert (naive.peak_mem_mb >= scores_mb).all()
    meta = json.loads((tmp_path / "attention_provenance.json").read_text())
    assert "profile_memory=True" in meta["peak_mem_mb"]


@pytest.mark.parametrize("naive_mem", [(1.0, 4.0), (0.0, float("nan"))], ids=["some-positive", "none"])
def test_memory_plot_leaves_out_non_positive_peaks_without_warning(tmp_path, naive_mem):
    from bench.plots import plot_attention

    shape = dict(head_dim=16, dtype="float32", image_tokens=16, image_fraction=0.5, heads=2)
    rows = [
        dict(shape, seq_len=L, backend=b, mode="fwd_bwd", status="ok", ms=1.0, tflops=1.0, peak_mem_mb=mem)
        for b, mems in (("naive", naive_mem), ("sdpa", (0.0, 0.0)))
        for L, mem in zip((64, 128), mems)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "attention.csv", index=False)
    (tmp_path / "attention_provenance.json").write_text(json.dumps({"device": "cpu"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        made = plot_attention(tmp_path)
    assert (tmp_path / "plots" / "attention_memory.png") in made
