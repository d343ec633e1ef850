"""bench kernel-check: every pinned (candidate, scheme) pair gets a row, failures and crashes are recorded,
an interrupted run resumes. Runs the kernels in Triton's CPU interpreter at a tiny shape."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from bench import kernel_check  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
if kernels.HAS_TRITON:
    from kernels.interval_attention import INTERPRET, interpreter_problem

    if INTERPRET and interpreter_problem():
        pytestmark = pytest.mark.skip(reason=str(interpreter_problem()))

TINY = ["--layout", "benchmark", "--batch", "2", "--seq-len", "40", "--heads", "1", "--head-dim", "32",
        "--dtype", "bfloat16", "--indices", "0,1"]  # fmt: skip


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_pair_passes_and_is_recorded(tmp_path):
    out = tmp_path / "kc.csv"
    assert kernel_check.main([*TINY, "--out", str(out)]) == 0
    rows = _rows(out)
    assert [(r["index"], r["mode"]) for r in rows] == [("0", "split"), ("0", "atomic"), ("1", "split"),
                                                       ("1", "atomic")]  # fmt: skip
    assert all(r["status"] == "pass" for r in rows)
    for n in ("out", "dq", "dk", "dv"):
        assert all(float(r[f"{n}_err"]) < 2e-2 and r[f"{n}_nan"] == "0" for r in rows), n
    # the atomic scheme launches no dQ kernel; index 1 pins the transposed dQ product (interpreter list)
    assert [r["dq_config"] for r in rows if r["mode"] == "atomic"] == ["atomic", "atomic"]
    assert rows[3]["dkdv_config"].endswith("dqT") and not rows[1]["dkdv_config"].endswith("dqT")


def test_a_wrong_result_fails(tmp_path, monkeypatch):
    real = kernel_check.reference

    def off_by_a_bit(*args):
        ref = real(*args)
        ref["dk"] = ref["dk"] * 1.1  # a 10% error, far above bf16's tolerance (2%)
        return ref

    monkeypatch.setattr(kernel_check, "reference", off_by_a_bit)
    out = tmp_path / "kc.csv"
    assert kernel_check.main([*TINY, "--indices", "0", "--modes", "split", "--out", str(out)]) == 1
    (row,) = _rows(out)
    assert row["status"] == "fail" and 0.05 < float(row["dk_err"]) < 0.2 and float(row["dv_err"]) < 2e-2


def test_reference_matches_float64_definition():
    layout = kernel_check.make_layout("mixed", 0, 0, torch.device("cpu"))
    q, k, v, g = (torch.randn(2, 1, 1100, 32, dtype=torch.float64) for _ in range(4))
    ref = kernel_check.reference(q, k, v, g, layout)
    mask = layout.dense_mask()[:, None]
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    s = torch.where(mask, q64 @ k64.transpose(-1, -2) / 32**0.5, float("-inf"))
    some = mask.any(-1, keepdim=True)
    out = torch.softmax(torch.where(some, s, 0.0), -1) * some @ v64
    out.backward(g)
    assert not some.all()  # the rows' padding: queries with no key
    for name, want in (("out", out), ("dq", q64.grad), ("dk", k64.grad), ("dv", v64.grad)):
        assert torch.allclose(ref[name].double(), want.detach(), atol=1e-4, rtol=1e-4), name


def test_a_crashed_pair_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "kc.csv"
    assert kernel_check.main([*TINY, "--indices", "0", "--modes", "split", "--out", str(out)]) == 0
    died = dict(layout="benchmark", batch=2, heads=1, seq_len=40, head_dim=32, dtype="bfloat16", tma="auto",
                index=1, mode="split", tolerance=0.02)  # fmt: skip
    out.with_suffix(".running").write_text(json.dumps(died))  # what a process killed inside (1, split) leaves
    assert kernel_check.main([*TINY, "--modes", "split", "--out", str(out)]) == 1
    rows = _rows(out)
    assert [(r["index"], r["mode"], r["status"]) for r in rows] == [("0", "split", "pass"),
                                                                    ("1", "split", "crashed")]  # fmt: skip
    assert not out.with_suffix(".running").exists()


BAD = [["--modes", "both"], ["--indices", "a"], ["--indices", "-1"], ["--heads", "0"]]


@pytest.mark.parametrize("bad", BAD)
def test_bad_arguments_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        kernel_check.parse_args(bad)
    assert bad[0] in capsys.readouterr().err


def test_one_file_holds_several_shapes(tmp_path):
    out = tmp_path / "kc.csv"
    assert kernel_check.main([*TINY, "--indices", "0", "--modes", "split", "--out", str(out)]) == 0
    other = [*TINY, "--indices", "autotuned", "--modes", "split", "--seq-len", "24", "--out", str(out)]
    assert kernel_check.main(other) == 0
    assert kernel_check.main(other) == 0  # done already: nothing runs, nothing is added
    rows = _rows(out)
    got = [(r["seq_len"], r["index"], r["status"]) for r in rows]
    assert got == [("40", "0", "pass"), ("24", "autotuned", "pass")]


def test_the_sweep_checks_the_configs_it_tuned(tmp_path, monkeypatch):
    """bench attention --kernel-check: in the sweep's process, as soon as the pivot shape is measured
    (before the other lengths), the autotuned configs there are checked, both schemes, into
    kernel_check.csv; and again after a variation at the pivot length with a dtype of its own, not after
    one that changes only the images (it runs the pivot's configs)."""
    from bench.attention import SweepProfile, check_tuned_kernel, kernel_check_shapes, run_sweep

    profile = SweepProfile(name="tiny", device="cpu", backends=["triton"], seq_lens=[32, 48], head_dims=[32],
                           dtypes=["bfloat16", "float32"], image_tokens=[16], image_fractions=[0.5, 0.0],
                           heads=1, tokens_per_batch=96, warmup=0, reps=1, pivot_len=48,
                           modes=("fwd",))  # fmt: skip
    shapes = kernel_check_shapes(profile)
    wanted = [(48, "bfloat16", 0.5), (48, "float32", 0.5)]
    assert [(s["seq_len"], s["dtype"], s["image_fraction"]) for s in shapes] == wanted
    order = []
    real = check_tuned_kernel

    def spy(profile, shape, rows, *args):
        # what the sweep had measured when it checked this shape
        order.append((shape["dtype"], [(r["seq_len"], r["dtype"]) for r in rows]))
        return real(profile, shape, rows, *args)

    monkeypatch.setattr("bench.attention.check_tuned_kernel", spy)
    checked: list[dict] = []
    rows = run_sweep(profile, tmp_path, check_kernel=True, checked=checked)
    measured = [(r["seq_len"], r["dtype"], r["image_fraction"]) for r in rows if r["backend"] == "triton"]
    assert measured == [*wanted[:1], (32, "bfloat16", 0.5), *wanted[1:], (48, "bfloat16", 0.0)]
    pivot, lengths, fp32 = [(48, "bfloat16")] * 2, [(32, "bfloat16")] * 2, [(48, "float32")] * 2
    assert order == [("bfloat16", pivot), ("float32", pivot + lengths + fp32)]  # each right after its rows
    meta = json.loads((tmp_path / "attention_provenance.json").read_text())
    assert meta["kernel_check"] is True and meta["kernel_check_shapes"] == shapes
    got = [(r["dtype"], r["index"], r["mode"], r["status"]) for r in checked]
    schemes = ("split", "atomic")
    assert got == [(dt, "autotuned", m, "pass") for dt in ("bfloat16", "float32") for m in schemes]
    written = _rows(tmp_path / "kernel_check.csv")
    in_csv = [(r["batch"], r["heads"], r["seq_len"], r["dtype"]) for r in written]
    assert in_csv == [("2", "1", "48", "bfloat16")] * 2 + [("2", "1", "48", "float32")] * 2
    # no triton timing at the shape: nothing to check
    assert check_tuned_kernel(profile, shapes[0], [dict(r, status="oom") for r in rows], tmp_path / "o") == []


def test_the_exit_status_counts_only_this_runs_pairs(tmp_path):
    out = tmp_path / "kc.csv"
    other = {k: "x" for k in kernel_check.FIELDS} | dict(status="fail", seq_len=999)  # another shape's row
    kernel_check._write_rows(out, [other])
    assert kernel_check.main([*TINY, "--indices", "0", "--modes", "split", "--out", str(out)]) == 0
    assert [r["status"] for r in _rows(out)] == ["fail", "pass"]


def test_outputs_are_poisoned_and_nan_fails(tmp_path, monkeypatch):
    """The checked call runs with NaN-poisoned buffers, and NaN left in an output fails the pair even
    where its error would pass (nan_to_num makes the error count it as zero)."""
    ia = kernel_check._ia()
    real = ia.interval_attention
    poisoned = []

    def leave_a_hole(q, k, v, lo, hi):
        poisoned.append(ia._POISON)
        out = real(q, k, v, lo, hi)
        return out.index_fill(2, torch.tensor([5]), float("nan"))  # one query row unwritten, as it were

    monkeypatch.setattr(ia, "interval_attention", leave_a_hole)
    out = tmp_path / "kc.csv"
    assert kernel_check.main([*TINY, "--indices", "autotuned", "--modes", "split", "--out", str(out)]) == 1
    (row,) = _rows(out)
    assert row["status"] == "fail" and int(row["out_nan"]) == 2 * 1 * 32  # 2 rows x 1 head x D
    assert poisoned == [False, True]  # autotuned: a tuning call first, then the poisoned, checked one


def test_a_fatal_error_ends_the_process_and_the_next_run_goes_on(tmp_path, monkeypatch):
    real = kernel_check.check_pair

    def crash_at_1(tensors, layout, tma, index, mode, *args, **kwargs):
        if index == 1:
            raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
        return real(tensors, layout, tma, index, mode, *args, **kwargs)

    monkeypatch.setattr(kernel_check, "check_pair", crash_at_1)
    out = tmp_path / "kc.csv"
    args = [*TINY, "--indices", "0,1,2", "--modes", "split", "--out", str(out)]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        kernel_check.main(args)
    rows = _rows(out)
    assert [(r["index"], r["status"]) for r in rows] == [("0", "pass"), ("1", "crashed")]
    assert rows[1]["fwd_config"] == "16x16 w4 s1" and "illegal memory access" in rows[1]["error"]  # planned
    assert out.with_suffix(".running").exists()  # so the retry loop knows to go on
    monkeypatch.setattr(kernel_check, "check_pair", real)
    assert kernel_check.main(args) == 1  # the crash is a pair that did not pass
    assert [(r["index"], r["status"]) for r in _rows(out)] == [("0", "pass"), ("1", "crashed"), ("2", "pass")]
    assert not out.with_suffix(".running").exists()


def test_an_error_without_a_message_is_recorded(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError()

    monkeypatch.setattr(kernel_check, "check_pair", fail)
    out = tmp_path / "kc.csv"
    assert kernel_check.main([*TINY, "--indices", "0", "--modes", "split", "--out", str(out)]) == 1
    (row,) = _rows(out)
    assert (
        row["status"] == "error" and row["error"] == "AssertionError: " and row["fwd_config"] == "16x16 w4 s1"
    )
    assert not out.with_suffix(".running").exists()


def test_indices_past_the_candidates_are_refused(tmp_path, capsys):
    assert kernel_check.main([*TINY, "--indices", "99", "--out", str(tmp_path / "kc.csv")]) == 2
    assert "--indices [99]" in capsys.readouterr().err and not (tmp_path / "kc.csv").exists()


def test_exclusions_leave_the_wrong_configs_out_of_the_gpu_lists(monkeypatch):
    """INTERVAL_ATTENTION_EXCLUDE (as gpu.sh sets it from the checks) removes exactly the named candidates
    at that dtype and head dim, and refuses to leave a kernel none."""
    ia = kernel_check._ia()
    monkeypatch.setattr(ia, "INTERPRET", False)  # the GPU candidate lists
    before = ia._candidates("dkdv", torch.bfloat16, 128, True)
    drop = ia.config_name(before[1])
    monkeypatch.setattr(ia, "_EXCLUDED", ia._parse_exclusions(f"dkdv,bfloat16,128,{drop}"))
    after = ia._candidates("dkdv", torch.bfloat16, 128, True)
    assert after == before[:1] + before[2:]
    assert ia._candidates("dkdv", torch.float16, 128, True) == before  # another dtype: untouched
    every = ";".join(
        f"dq,bfloat16,64,{ia.config_name(c)}" for c in ia._candidates("dq", torch.bfloat16, 64, True)
    )
    monkeypatch.setattr(ia, "_EXCLUDED", ia._parse_exclusions(every))
    with pytest.raises(ValueError, match="leaves kernel 'dq' no candidate"):
        ia._candidates("dq", torch.bfloat16, 64, True)

    def pointer(kernel, i):  # no TMA on a CPU tensor; a pinned index past the list takes its last
        cands = [c for c in ia._GPU_CANDIDATES[kernel][("half", 128)] if not c[4]]
        return ia.config_name(cands[min(i, len(cands) - 1)])

    with ia.kernel_configs(index=1):  # what a pinned pair will launch, named before it runs
        want = {"fwd": pointer("fwd", 1), "dkdv-atomic": pointer("dkdv-atomic", 1)}
        assert ia.planned_configs(torch.bfloat16, 128, torch.device("cpu"), "atomic") == want
        want = {"fwd": pointer("fwd", 1), "dkdv": pointer("dkdv", 1), "dq": pointer("dq", 1)}
        assert ia.planned_configs(torch.bfloat16, 128, torch.device("cpu"), "split") == want
    assert ia.planned_configs(torch.bfloat16, 128, torch.device("cpu"), "atomic") == {}  # not pinned


def test_bad_exclusions_are_refused():
    ia = kernel_check._ia()
    for bad in ("dkdv,bfloat16,128", "nokernel,bfloat16,128,16x16 w4 s1", "dq,bfloat16,x,16x16 w4 s1"):
        with pytest.raises(ValueError, match="INTERVAL_ATTENTION_EXCLUDE entry"):
            ia._parse_exclusions(bad)


def test_exclusions_from_a_folder(tmp_path, capsys, monkeypatch):
    """--exclusions-from prints what gpu.sh exports: the culprit of a failed pair, at its dtype and D."""
    real = kernel_check.reference

    def dq_off(*args):
        ref = real(*args)
        ref["dq"] = ref["dq"] * 1.5
        return ref

    monkeypatch.setattr(kernel_check, "reference", dq_off)
    assert kernel_check.main([*TINY, "--indices", "0", "--out", str(tmp_path / "kernel_check.csv")]) == 1
    capsys.readouterr()
    assert kernel_check.main(["--exclusions-from", str(tmp_path)]) == 0
    # split: the dQ kernel; atomic: the dK/dV kernel, which adds dQ; bf16 and fp16 share the half lists
    want = ";".join(f"{k},{d},32,16x16 w4 s1" for k in ("dkdv-atomic", "dq") for d in ("bfloat16", "float16"))
    assert capsys.readouterr().out.strip() == want


def test_an_index_at_the_count_is_refused(tmp_path):
    n_idx, _ = kernel_check._candidate_range(False, torch.bfloat16, 32)
    assert (
        kernel_check.main(
            [*TINY, "--indices", str(n_idx - 1), "--modes", "split", "--out", str(tmp_path / "a.csv")]
        )
        == 0
    )
    assert kernel_check.main([*TINY, "--indices", str(n_idx), "--out", str(tmp_path / "b.csv")]) == 2


def test_autotuned_rows_name_the_tma_setting_the_process_runs_with(tmp_path, monkeypatch):
    ia = kernel_check._ia()
    monkeypatch.setattr(ia, "_TMA_MODE", False)  # as INTERVAL_ATTENTION_TMA=0 sets it
    out = tmp_path / "kc.csv"
    assert kernel_check.main([*TINY, "--indices", "autotuned", "--modes", "split", "--out", str(out)]) == 0
    (row,) = _rows(out)
    assert row["tma"] == "off" and row["index"] == "autotuned"
    assert row["fwd_config"] == ia.config_name(ia.launched_configs()["fwd"])  # what the kernel really ran


def test_a_check_that_fails_to_run_does_not_cost_the_sweep(tmp_path, monkeypatch, capsys):
    from bench.attention import SweepProfile, run_sweep

    def broken(*args):
        raise KeyError("a bug in the check")

    monkeypatch.setattr("bench.attention.check_tuned_kernel", broken)
    profile = SweepProfile(name="tiny", device="cpu", backends=["sdpa"], seq_lens=[32, 48], head_dims=[16],
                           dtypes=["float32"], image_tokens=[16], image_fractions=[0.5], heads=1,
                           tokens_per_batch=96, warmup=0, reps=1, pivot_len=48, modes=("fwd",))  # fmt: skip
    rows = run_sweep(profile, tmp_path, check_kernel=True, checked=[])
    assert [r["seq_len"] for r in rows if r["backend"] == "sdpa"] == [48, 32]  # the sweep went on
    assert "kernel check at L = 48, D = 16, float32 failed to run: KeyError" in capsys.readouterr().out
