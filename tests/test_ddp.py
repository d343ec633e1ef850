"""Data parallel training: two gloo CPU processes under torchrun match one process at the same global batch.

Both runs build the same global batch (4 rows); under torchrun each rank trains on 2 rows, weights its
losses by its share of the global LM tokens / images and DDP averages the gradients, so the two runs
compute the same update up to float summation order. Tolerance: 1e-5 relative on every logged loss and
the gradient norm over 8 steps (observed: ~1e-7). Token and FLOP counts must agree exactly.

FSDP2 (``train.parallel=fsdp``): the same comparison with two gloo CPU processes whose blocks and root
are ``fully_shard``-ed; the run stops at step 4 and resumes under FSDP for steps 5-8 (the gathered
full-state checkpoint loads back into the shards), then the final checkpoint loads in this single
process. Tolerance: FSDP_RTOL = 1e-4 relative on the logged losses and gradient norm, FSDP_WEIGHT_ATOL
on the final weights (float summation order differs: reduce-scatter vs one process; observed: ~1.5e-7
relative on the losses, 1.6e-6 absolute on the weights).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.test_train import SMALL_ARGS, cli_env, small_cfgs
from transfusion.train import (
    FSDP_AUTO_THRESHOLD,
    ConfigError,
    LossPart,
    TrainConfig,
    _load_optimizer_state,
    _objective,
    _optimizer_state_by_name,
    build_optimizer,
    check_config,
    load_checkpoint_model,
    read_metrics,
    resolve_parallel,
)

RTOL = 1e-5
FSDP_RTOL = 1e-4
FSDP_WEIGHT_ATOL = 1e-5
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


def _single_process(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The one-process reference run, started in the background while the two-process run goes."""
    cmd = [sys.executable, "-m", "transfusion.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*launcher, "-m", "transfusion.cli", *args], env=env, capture_output=True, timeout=300
    )


def test_parallel_option_is_checked_and_resolved():
    with pytest.raises(ConfigError, match=r"train\.parallel = 'zero'.*'ddp', 'fsdp', 'auto', 'none'"):
        TrainConfig(parallel="zero")
    model_cfg, train_cfg = small_cfgs(parallel="none")
    with pytest.raises(ConfigError, match=r"train\.parallel = 'none'"):
        check_config(model_cfg, train_cfg, world_size=2)
    auto = TrainConfig(parallel="auto")
    assert resolve_parallel(auto, 2, FSDP_AUTO_THRESHOLD + 1) == "fsdp"
    assert resolve_parallel(auto, 2, FSDP_AUTO_THRESHOLD) == "ddp"
    assert resolve_parallel(TrainConfig(parallel="fsdp"), 1, 10**10) == "none"  # one process: no wrapper
    assert resolve_parallel(TrainConfig(), 4, 10**10) == "ddp"  # the default


def test_optimizer_state_converts_between_index_and_name_formats():
    # A single process loads an FSDP checkpoint's name-keyed optimizer state, and an index-keyed one
    # (DDP / single process) converts to names for FSDP.
    torch.manual_seed(0)
    cfg, cpu = TrainConfig(), torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = build_optimizer(model, cfg, cpu)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    by_name = _optimizer_state_by_name(model, {"optimizer": opt.state_dict()}, cfg, cpu)
    assert set(by_name["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    fqn_state = {"optimizer": by_name, "optimizer_format": "fqn"}
    assert _optimizer_state_by_name(model, fqn_state, cfg, cpu) is by_name
    fresh = build_optimizer(model, cfg, cpu)
    _load_optimizer_state(model, fresh, by_name, fqn=True, sharded=False)
    for i, (a, b) in enumerate(zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values())):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[key], b[key]), (i, key)


def test_fsdp_two_gloo_processes_match_one_process_and_checkpoint_loads_in_one(tmp_path):
    env = cli_env()
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    base = ["train", *SMALL_ARGS, *ARGS]
    one = _single_process([*base, "--out", str(single)], env)
    first = _torchrun([*base, "parallel=fsdp", "ckpt_every=4", "--out", str(fsdp)], env)
    assert first.returncode == 0, first.stderr.decode()[-3000:]
    # Simulate a crash after step 4: drop the step-8 checkpoint and resume from step 4 under FSDP.
    ckpt = fsdp / "checkpoints"
    for suffix in (".safetensors", ".state.pt"):
        (ckpt / f"step_00000008{suffix}").unlink()
    state = torch.load(ckpt / "step_00000004.state.pt", weights_only=False)
    assert state["parallel"] == "fsdp" and state["optimizer_format"] == "fqn"
    latest = {"step": 4, "model": "step_00000004.safetensors", "state": "step_00000004.state.pt"}
    (ckpt / "latest.json").write_text(json.dumps(latest))
    second = _torchrun([*base, "parallel=fsdp", "ckpt_every=4", "--out", str(fsdp), "--resume"], env)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err.decode()[-2000:]

    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(fsdp / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=FSDP_RTOL), (ra["step"], key)
        for key in ("tokens_seen", "train_flops", "lr"):
            assert rb[key] == ra[key], (ra["step"], key)
    cfg = json.loads((fsdp / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["parallel"] == "fsdp"
    assert [r["parallel"] for r in cfg["resumes"]] == ["fsdp"]

    # The gathered checkpoint is a plain full state dict: it loads in this one process.
    ref, got = load_checkpoint_model(single).state_dict(), load_checkpoint_model(fsdp).state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=FSDP_WEIGHT_ATOL, msg=k)


def test_two_gloo_processes_match_one_process(tmp_path):
    env = cli_env()
    single, double = tmp_path / "single", tmp_path / "ddp"
    base = ["train", *SMALL_ARGS, *ARGS]
    one = _single_process([*base, "--out", str(single)], env)
    two = _torchrun([*base, "--out", str(double)], env)
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
