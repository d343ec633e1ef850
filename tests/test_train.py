"""Training loop, data stream and checkpoints: outputs, falling losses, exact resume after SIGKILL,
non-finite loss reporting.

Runs use a very small model and the parameter-free ``pool`` latent source (no autoencoder), with
one-object shapes captions so documents fit 128-token rows.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transfusion.config import get_preset
from transfusion.packing import SpecialTokens
from transfusion.train import (
    METRIC_FIELDS,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    latest_checkpoint,
    load_checkpoint_model,
    lr_multiplier,
    read_metrics,
    train,
)
from transfusion.training_data import MixedModalStream, StreamConfig, image_range, slice_rows

ROOT = Path(__file__).resolve().parent.parent

SMALL_MODEL = dict(dim=32, n_layers=1, n_heads=2, latent_size=4)
SMALL_TRAIN = dict(
    autoencoder="pool",
    train_examples=128,
    dataset_options={"max_objects": 1},
    seq_len=128,
    batch_rows=4,
    device="cpu",
    progress=False,
    cache_dir="none",
)
# The same configuration as CLI arguments (for the subprocess tests).
SMALL_ARGS = [
    "--preset", "tiny", "--device", "cpu",
    "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.latent_size=4",
    "autoencoder=pool", "train_examples=128", "data.max_objects=1", "seq_len=128", "batch_rows=4",
    "progress=false", "cache_dir=none",
]  # fmt: skip


def small_cfgs(**train_overrides):
    return get_preset("tiny", **SMALL_MODEL), TrainConfig(**{**SMALL_TRAIN, **train_overrides})


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


# ---------------------------------------------------------------------- schedule
def test_lr_schedule_warmup_then_cosine():
    f = lambda s: lr_multiplier(s, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert lr_multiplier(5, warmup_steps=0, total_steps=5, min_ratio=0.0) == pytest.approx(0.0)


def test_train_config_rejects_bad_values_naming_the_key():
    for kw, key in [
        (dict(lr=-1.0), "train.lr"),
        (dict(lr=float("nan")), "train.lr"),
        (dict(steps=0), "train.steps"),
        (dict(betas=(0.9, 1.5)), "train.betas"),
        (dict(precision="fp8"), "train.precision"),
        (dict(steps="10"), "train.steps"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            TrainConfig(**kw)


# ---------------------------------------------------------------------- data stream
def _toy_stream(seed=0, n=40, seq_len=64, rows=3, dropout=0.1):
    g = torch.Generator().manual_seed(123)
    captions = [torch.randint(5, 200, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]  # fmt: skip
    latents = torch.randn(n, 4, 4, 4, generator=g)
    cfg = StreamConfig(seq_len=seq_len, batch_rows=rows, patch_size=2, caption_dropout=dropout, seed=seed)
    return MixedModalStream(captions, latents, cfg, SpecialTokens(), vocab_size=256)


def _same_batch(a, b):
    return (
        torch.equal(a.tokens, b.tokens)
        and torch.equal(a.latents, b.latents)
        and torch.equal(a.lm_targets, b.lm_targets)
        and torch.equal(a.image_first, b.image_first)
        and torch.equal(a.caption_dropped, b.caption_dropped)
        and a.image_spans == b.image_spans
    )


def test_stream_is_deterministic_and_restorable():
    s1, s2 = _toy_stream(), _toy_stream()
    batches = []
    for _ in range(12):  # crosses several epochs of 40 examples
        peeked = s1.peek()
        batches.append(next(s1))
        assert _same_batch(peeked, batches[-1])
    for b in batches:
        assert _same_batch(b, next(s2))
    s3 = _toy_stream()
    for _ in range(5):
        next(s3)
    state = s3.state_dict()
    s4 = _toy_stream()
    s4.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON-able ints
    for b in batches[5:]:
        assert _same_batch(b, next(s4))
    assert not _same_batch(batches[0], next(iter(_toy_stream(seed=1))))


def test_stream_documents_follow_the_recipe():
    stream = _toy_stream(n=400, seq_len=96, rows=4, dropout=0.1)
    sp = SpecialTokens()
    firsts, dropped, images = 0, 0, 0
    for _ in range(60):
        b = next(stream)
        assert b.tokens.shape == (4, 96)
        rows_with_images = {r for r, _, _ in b.image_spans}
        assert rows_with_images == set(range(4)), "every row holds an image (DDP shards never lack one)"
        for r, s, e in b.doc_spans:
            doc = b.tokens[r, s:e].tolist()
            assert doc[0] == sp.bos and doc[-1] == sp.eos
            assert doc.count(sp.boi) == 1 and doc.count(sp.eoi) == 1
            if doc[1] == sp.boi:  # image-first, or caption-first with the caption dropped
                continue
            assert doc[-2] == sp.eoi  # caption-first: ... <BOI> image <EOI> <EOS>
        images += b.num_images
        firsts += int(b.image_first.sum())
        dropped += int(b.caption_dropped.sum())
    assert abs(firsts / images - 0.2) < 0.05
    assert abs(dropped / (images - firsts) - 0.1) < 0.04
    assert not (b.image_first & b.caption_dropped).any()


def test_stream_rejects_documents_longer_than_a_row():
    with pytest.raises(ValueError, match="seq_len = 16"):
        _toy_stream(seq_len=16)


def test_slice_rows_partitions_a_batch():
    b = next(_toy_stream(rows=4, seq_len=64))
    parts = [slice_rows(b, 0, 2), slice_rows(b, 2, 4)]
    assert torch.equal(torch.cat([p.tokens for p in parts]), b.tokens)
    assert torch.equal(torch.cat([p.latents for p in parts]), b.latents)
    assert sum(p.num_images for p in parts) == b.num_images
    assert image_range(b, 2, 4) == (parts[0].num_images, b.num_images)
    for p in parts:
        p.layout.validate()
        assert p.patch_index().shape[0] == p.num_images
        assert int(p.lm_mask.sum()) > 0


# ---------------------------------------------------------------------- FLOP accounting edge cases
def test_flops_fall_back_to_the_analytic_count_and_a_family_without_one_keeps_the_counter(
    tmp_path, monkeypatch
):
    import transfusion.train as train_module
    from transfusion.families import TransfusionFamily

    def broken(fn):
        raise RuntimeError("this backend cannot be traced")

    model_cfg, train_cfg = small_cfgs(steps=2, log_every=1)
    with monkeypatch.context() as m, pytest.warns(UserWarning, match="FLOP measurement failed"):
        m.setattr(train_module, "measure_without_attention", broken)
        train(model_cfg, train_cfg, tmp_path / "fallback")
    flops = json.loads((tmp_path / "fallback" / "config.json").read_text())["flops"]
    analytic = flops["analytic_first_step"]
    assert flops["source"] == "analytic (measurement failed)"
    assert flops["measured_step"] == pytest.approx(analytic["total"], rel=1e-12)
    assert flops["counted_step"] == pytest.approx(analytic["total_dense_attention"], rel=1e-12)

    # no analytic count: the counter's raw count, attention as the backend computes it, counted once
    calls = []
    with monkeypatch.context() as m:
        m.setattr(TransfusionFamily, "analytic_flops", lambda self, cfg, batch: None)
        m.setattr(train_module, "measure_without_attention", broken)
        m.setattr(train_module, "measure_flops", lambda fn: calls.append(1) or (123.0, {}))
        train(model_cfg, train_cfg, tmp_path / "plugin")
    flops = json.loads((tmp_path / "plugin" / "config.json").read_text())["flops"]
    assert calls == [1] and flops["measured_step"] == flops["counted_step"] == 123.0
    assert flops["counted_attention"] == 0 and flops["source"].startswith("FlopCounterMode (attention as")


# ---------------------------------------------------------------------- a short run
def test_short_run_writes_config_metrics_checkpoints_and_losses_fall(tmp_path):
    model_cfg, train_cfg = small_cfgs(steps=60, lr=5e-3, warmup_steps=5, log_every=5, ckpt_every=20)
    out = tmp_path / "run"
    result = train(model_cfg, train_cfg, out, preset="tiny")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["dim"] == 32 and cfg["train"]["steps"] == 60 and cfg["preset"] == "tiny"
    assert cfg["provenance"]["torch"] == torch.__version__ and "commit" in cfg["provenance"]
    assert cfg["data"]["latents"]["source"] == "pool"
    flops = cfg["flops"]  # attention counted on allowed pairs: near the analytic total (adapter: < 0.5%)
    assert flops["measured_step"] == pytest.approx(flops["analytic_first_step"]["total"], rel=5e-3)
    assert flops["counted_attention"] > flops["analytic_first_step"]["attention_allowed"] > 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, *range(5, 61, 5)]
    for r in rows:
        assert set(METRIC_FIELDS) <= set(r), set(METRIC_FIELDS) - set(r)
        assert r["loss"] == pytest.approx(r["lm_loss"] + model_cfg.diffusion_lambda * r["diffusion_loss"])
    assert rows[-1]["train_flops"] == pytest.approx(60 * cfg["flops"]["measured_step"])
    assert rows[-1]["tokens_seen"] > rows[0]["tokens_seen"] > 0
    assert rows[0]["lr"] < rows[2]["lr"] and rows[-1]["lr"] < rows[2]["lr"]  # warmup, then decay
    first, last = rows[:3], rows[-3:]
    for key in ("lm_loss", "diffusion_loss"):
        a = sum(r[key] for r in first) / 3
        b = sum(r[key] for r in last) / 3
        assert b < 0.85 * a, (key, a, b)
    ck = out / "checkpoints"
    assert latest_checkpoint(out)["step"] == 60
    assert sorted(p.name for p in ck.glob("step_*.safetensors")) == [
        "step_00000040.safetensors",
        "step_00000060.safetensors",
    ]  # keep_checkpoints = 2
    assert (out / "tokenizer.json").exists()
    model = load_checkpoint_model(out)
    for (name, p), q in zip(model.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ConfigError, match="--resume"):
        train(model_cfg, train_cfg, out)  # refuses to overwrite a run


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path):
    # lr = 1e6 blows the weights up within a few steps; checkpoints every 2 steps.
    model_cfg, train_cfg = small_cfgs(steps=30, lr=1e6, warmup_steps=0, ckpt_every=2, log_every=1)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train(model_cfg, train_cfg, out)
    msg = str(info.value)
    bad_step = int(msg.split(" at step ")[1].split()[0])
    latest = latest_checkpoint(out)
    assert latest is not None and latest["step"] < bad_step
    assert msg.startswith("non-finite"), msg
    assert f"last good checkpoint: {out / 'checkpoints' / latest['model']} (step {latest['step']})" in msg
    rows = read_metrics(out / "metrics.jsonl")
    assert rows and max(r["step"] for r in rows) < bad_step
    assert all(math.isfinite(r["loss"]) for r in rows)


# ---------------------------------------------------------------------- exact resume after SIGKILL
def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transfusion.cli", "train", *SMALL_ARGS, "--out", str(out), *extra]


RESUME_ARGS = ["--steps", "60", "ckpt_every=5", "log_every=1", "lr=3e-3", "warmup_steps=5"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    env = cli_env()
    ref = subprocess.Popen(
        _cli(ref_dir, *RESUME_ARGS), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        _cli(run_dir, *RESUME_ARGS), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        latest = latest_checkpoint(run_dir) if (run_dir / "checkpoints" / "latest.json").exists() else None
        if latest and latest["step"] >= 10:
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = latest["step"]
            break
        time.sleep(0.01)
    victim.wait(timeout=60)
    assert killed_at is not None and victim.returncode == -signal.SIGKILL, victim.stderr.read().decode()[
        -2000:
    ]
    stopped = latest_checkpoint(run_dir)["step"]
    assert stopped < 60, "the run finished before it could be killed"

    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err.decode()[-2000:]
    resumed = subprocess.run(
        _cli(run_dir, *RESUME_ARGS, "--resume"), env=env, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert f"resumed from step {stopped}" in resumed.stderr.decode()

    a, b = read_metrics(ref_dir / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 61)), "metrics.jsonl: every step exactly once"
    assert [r["step"] for r in a] == list(range(1, 61))
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (
                ra["step"],
                key,
                ra[key],
                rb[key],
            )
        for key in ("lr", "tokens_seen", "train_flops"):
            assert ra[key] == rb[key], (ra["step"], key)
    from safetensors.torch import load_file

    wa = load_file(ref_dir / "checkpoints" / "step_00000060.safetensors")
    wb = load_file(run_dir / "checkpoints" / "step_00000060.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["resumes"][0]["step"] == stopped


# ---------------------------------------------------------------------- the default autoencoder path
QUICK_AE = {"steps": 3, "batch_size": 8, "train_images": 32, "val_images": 8, "scale_images": 16}


def test_auto_autoencoder_is_trained_once_then_reused_from_the_cache(tmp_path, capfd):
    pytest.importorskip("diffusers")
    cache = tmp_path / "cache"
    model_cfg, train_cfg = small_cfgs(
        steps=2, autoencoder="auto", autoencoder_options=QUICK_AE, cache_dir=str(cache), train_examples=48
    )
    train(model_cfg, train_cfg, tmp_path / "a")
    assert "training a quick autoencoder" in capfd.readouterr().err
    info = json.loads((tmp_path / "a" / "config.json").read_text())["data"]["latents"]
    assert info["source"] == "auto" and info["latent_shape"] == [4, 4, 4]
    assert (tmp_path / "a" / "autoencoder").is_dir()
    assert len(list((cache / "autoencoders").iterdir())) == 1
    train(model_cfg, train_cfg, tmp_path / "b")
    assert "reusing the cached autoencoder" in capfd.readouterr().err
    rows_a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert rows_a == [{**r, "wall_time": a["wall_time"]} for r, a in zip(rows_b, rows_a)]  # same latents
