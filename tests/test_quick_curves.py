"""bench.quick_curves pieces that the end-to-end quick test does not pin down: FLOPs at unlogged
checkpoint steps, and parity ratios when a family or a metric is missing."""

import json

import pytest

from bench.quick_curves import checkpoint_steps, flops_at, parity_ratios


def test_checkpoint_steps_and_flops_between_logged_steps(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for step in (4, 2, 3):
        (tmp_path / "checkpoints" / f"step_{step:08d}.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "step_00000004.state.pt").write_bytes(b"")  # not a model checkpoint
    rows = [
        {"step": 1, "train_flops": 10.0},
        {"step": 2, "train_flops": 20.0},
        {"step": 4, "train_flops": 40.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert checkpoint_steps(tmp_path) == [2, 3, 4]
    assert flops_at(tmp_path, [2, 3, 4]) == {2: 20.0, 3: pytest.approx(30.0), 4: 40.0}


def _curve(values: list[float], flops: list[float], metric: str = "text_bpb") -> dict:
    return {"points": [{"train_flops": f, metric: v} for f, v in zip(flops, values)]}


def test_parity_ratios_from_curves_and_gaps():
    curves = {
        "transfusion": _curve([3.0, 2.0, 1.0], [1.0, 10.0, 100.0]),
        "discrete": _curve([2.5, 1.5], [10.0, 1000.0]),
    }
    par = parity_ratios(curves)
    assert par["text_bpb"]["kind"] == "exact"
    assert par["text_bpb"]["flops"] == pytest.approx(10**1.5)  # halfway between 10 and 100 in log-FLOPs
    assert par["text_bpb"]["ratio"] == pytest.approx(10**1.5 / 1000.0)
    assert par["fid"] is None and par["caption_accuracy"] is None  # metrics the curves do not have
    assert all(v is None for v in parity_ratios({"transfusion": curves["transfusion"]}).values())
    # a metric missing at some checkpoints (FID could not be computed there) is read from the others
    gappy = {"transfusion": {"points": [{"train_flops": 1.0, "fid": None}, {"train_flops": 2.0, "fid": 5.0}]},
             "discrete": {"points": [{"train_flops": 4.0, "fid": 6.0}]}}  # fmt: skip
    assert parity_ratios(gappy)["fid"]["kind"] == "at_most"
