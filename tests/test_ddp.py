"""Data parallel training: two gloo CPU processes under torchrun match one process at the same global batch.

Both runs build the same global batch (4 rows); under torchrun each rank trains on 2 rows, weights its
losses by its share of the global LM tokens / images and DDP averages the gradients, so the two runs
compute the same update up to float summation order. Tolerance: 1e-5 relative on every logged loss and
the gradient norm over 8 steps (observed: ~1e-7). Token and FLOP counts must agree exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.test_train import SMALL_ARGS, cli_env
from transfusion.train import LossPart, _objective, read_metrics

RTOL = 1e-5
ARGS = ["--steps", "8", "log_every=1", "lr=3e-3", "warmup_steps=2", "ckpt_every=0"]


def test_objective_weights_parts_by_their_global_share():
    # rank 0 of 2 holds 3 of 10 LM tokens and 1 of 4 images
    parts = [
        LossPart("lm", torch.tensor(2.0), count=3, total=10, weight=1.0),
        LossPart("diffusion", torch.tensor(0.5), count=1, total=4, weight=5.0),
    ]
    objective, contrib = _objective(parts, world=2)
    assert contrib.tolist() == pytest.approx([2.0 * 0.3, 0.5 * 0.25])
    assert float(objective) == pytest.approx(2 * (0.6 + 5 * 0.125))
    absent = [LossPart("lm", torch.tensor(1.0), 4, 4), LossPart("diffusion", torch.tensor(0.0), 0, 0, 5.0)]
    assert _objective(absent, world=1)[1].tolist() == [1.0, 0.0]  # a part absent from the batch adds 0


def test_two_gloo_processes_match_one_process(tmp_path):
    env = cli_env()
    single, double = tmp_path / "single", tmp_path / "ddp"
    base = ["train", *SMALL_ARGS, *ARGS]
    one = subprocess.Popen(
        [sys.executable, "-m", "transfusion.cli", *base, "--out", str(single)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "transfusion.cli",
            *base,
            "--out",
            str(double),
        ],  # fmt: skip
        env=env,
        capture_output=True,
        timeout=300,
    )
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err.decode()[-2000:]
    assert two.returncode == 0, two.stderr.decode()[-3000:]

    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(double / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=RTOL), (ra["step"], key)
        for key in ("tokens_seen", "train_flops", "lr"):
            assert rb[key] == ra[key], (ra["step"], key)
    assert json.loads((double / "config.json").read_text())["world_size"] == 2
