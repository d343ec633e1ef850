"""The discrete (Chameleon-style) family end to end: ``transfusion train --model discrete`` writes what a
Transfusion run writes, resumes exactly, counts FLOPs the same way, and ``transfusion generate`` works on it.

One tiny run of each family (12 steps, 4x4 latents / codes, a 64-entry codebook, autoencoders trained for
3 steps) is made once for the module; other tests reuse their autoencoders through the shared cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transfusion.cli import main, resolve_train_args
from transfusion.config import ModelConfig
from transfusion.train import (
    METRIC_FIELDS,
    ConfigError,
    check_config,
    latest_checkpoint,
    load_checkpoint_model,
    read_metrics,
    train,
)

pytest.importorskip("diffusers")

STEPS, K = 12, 64
KEYS = [
    "device=cpu", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.latent_size=4",
    "train_examples=128", "data.max_objects=1", "seq_len=128", "batch_rows=4",
    "progress=false", "threads=1", "attention=naive", "log_every=1", "ckpt_every=4", "lr=5e-3",
    "warmup_steps=2",
    "ae.steps=3", "ae.batch_size=8", "ae.train_images=32", "ae.val_images=8", "ae.scale_images=16",
    f"ae.codebook_size={K}",
]  # fmt: skip
ARGS = ["--preset", "tiny", *KEYS]
LOGGED_ONLY = {"text_loss", "image_loss"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    """A tiny run of each family through the CLI, identical but for ``--model``."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    out = {}
    for family in ("transfusion", "discrete"):
        out[family] = root / family
        argv = ["train", *ARGS, "--model", family, "--steps", str(STEPS), "--out", str(out[family])]
        assert main([*argv, f"cache_dir={cache}"]) == 0
    assert torch.get_num_threads() == threads
    return out


def config_json(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


# ---------------------------------------------------------------------- configuration
def test_codebook_size_is_validated():
    assert ModelConfig().codebook_size == 0
    assert ModelConfig(codebook_size=K).codebook_size == K
    for bad in (-1, True, 2.0, "64"):
        with pytest.raises(ValueError, match="codebook_size"):
            ModelConfig(codebook_size=bad)


def test_switching_the_family_changes_nothing_else(runs, capsys, tmp_path):
    resolved = {}
    for family in ("transfusion", "discrete"):
        assert main(["train", *ARGS, "--model", family, "--out", str(tmp_path / "x"), "--dry-run"]) == 0
        resolved[family] = json.loads(capsys.readouterr().out)
    t, d = resolved["transfusion"], resolved["discrete"]
    assert (t["train"].pop("family"), d["train"].pop("family")) == ("transfusion", "discrete")
    assert t == d  # the resolved configuration: model (qk_norm included), train, preset
    assert d["model"]["qk_norm"] is False and d["model"]["codebook_size"] == 0

    ct, cd = config_json(runs["transfusion"]), config_json(runs["discrete"])
    assert (ct["family"], cd["family"]) == ("transfusion", "discrete")
    assert {k for k in ct["train"] if ct["train"][k] != cd["train"][k]} == {"family"}
    assert ct["model_requested"] == cd["model_requested"]
    # The written model config differs only by the codebook the VQ autoencoder brought.
    assert {k for k in ct["model"] if ct["model"][k] != cd["model"][k]} == {"codebook_size"}
    assert (ct["model"]["codebook_size"], cd["model"]["codebook_size"]) == (0, K)


@pytest.mark.parametrize(
    "extra, key",
    [
        (["autoencoder=pool"], "train.autoencoder"),
        (["model.codebook_size=32"], "ae.codebook_size"),  # ARGS ask the VQ for 64 codes
        (["ae.kind=vae"], "ae.kind"),
        (["seq_len=40"], "train.seq_len"),  # caption + 16 codes + 4 specials do not fit
    ],
)
def test_bad_discrete_configurations_fail_before_work(tmp_path, capsys, extra, key):
    out = tmp_path / "run"
    code = main(
        ["train", *ARGS, "--model", "discrete", "--steps", "2", "--out", str(out), "cache_dir=none", *extra]
    )
    err = capsys.readouterr().err
    assert code == 2 and key in err, err
    assert not (out / "autoencoder").exists()


def test_a_vae_is_refused_as_the_discrete_familys_autoencoder(runs):
    vae = runs["transfusion"] / "autoencoder"
    model_cfg, train_cfg, _ = resolve_train_args(
        "tiny", None, [*KEYS, f"autoencoder={vae}"], steps=2, family="discrete"
    )
    with pytest.raises(ConfigError, match=r"train\.autoencoder.*'vae'.*VQ"):
        check_config(model_cfg, train_cfg)


# ---------------------------------------------------------------------- the run's outputs
def test_a_discrete_run_writes_what_a_transfusion_run_writes(runs):
    d, t = runs["discrete"], runs["transfusion"]
    rows, t_rows = read_metrics(d / "metrics.jsonl"), read_metrics(t / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in t_rows] == list(range(1, STEPS + 1))
    assert set(METRIC_FIELDS) <= set(t_rows[0])
    for r in rows:
        assert set(r) == set(t_rows[0]) | LOGGED_ONLY
        assert r["loss"] == r["lm_loss"] and r["diffusion_loss"] == 0.0
        # the LM loss is the token-weighted mean of its text and image-code parts
        lo, hi = sorted((r["text_loss"], r["image_loss"]))
        assert lo - 1e-5 <= r["lm_loss"] <= hi + 1e-5
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)
    for key in ("lm_loss", "text_loss", "image_loss"):
        assert mean(key, rows[-3:]) < mean(key, rows[:3]) - 0.1, key
    assert latest_checkpoint(d)["step"] == STEPS
    names = sorted(p.name for p in (d / "checkpoints").glob("step_*.safetensors"))
    assert names == [f"step_{s:08d}.safetensors" for s in (8, 12)]
    assert (d / "tokenizer.json").is_file() and (d / "autoencoder" / "autoencoder.json").is_file()
    cfg = config_json(d)
    assert cfg["data"]["latents"]["kind"] == "vq" and cfg["data"]["latents"]["codebook_size"] == K
    from transfusion.baseline import DiscreteLM

    model = load_checkpoint_model(d)
    assert isinstance(model, DiscreteLM) and model.codebook_size == K and model.text_vocab == 512
    assert cfg["params"]["total"] == sum(p.numel() for p in model.parameters())


def test_flops_are_measured_like_transfusions_and_match_the_analytic_count(runs):
    for family, run in runs.items():
        cfg = config_json(run)
        flops = cfg["flops"]
        assert flops["source"].startswith("FlopCounterMode without attention"), family
        rows = read_metrics(run / "metrics.jsonl")
        assert rows[-1]["train_flops"] == pytest.approx(STEPS * flops["measured_step"])
        # what training records: the count without attention, plus attention on allowed pairs only
        allowed = flops["analytic_first_step"]["attention_allowed"]
        assert flops["measured_step"] == flops["counted_step"] - flops["counted_attention"] + allowed
        assert 0 < allowed < flops["counted_attention"], family  # the backend computed more pairs
    flops = config_json(runs["discrete"])["flops"]
    analytic = flops["analytic_first_step"]
    # naive attention computes every (q, k) pair: the counter sees the dense-attention count, exactly,
    # and training keeps the analytic count of the pairs the causal mask allows.
    assert flops["counted_step"] == pytest.approx(analytic["total_dense_attention"], rel=1e-6)
    assert flops["counted_attention"] == pytest.approx(analytic["attention_dense"], rel=1e-6)
    assert flops["measured_step"] == pytest.approx(analytic["total"], rel=1e-6)
    assert analytic["lm_head"] == 3 * 2 * 32 * (512 + K) * analytic["lm_tokens"]  # the full vocabulary
    assert analytic["adapter"] == 0 and analytic["images"] == 0


# ---------------------------------------------------------------------- exact resume
def test_resume_after_a_crash_is_exact(runs, cache, tmp_path):
    model_cfg, train_cfg, _ = resolve_train_args(
        "tiny", None, [*KEYS, f"cache_dir={cache}", "ckpt_every=3"], steps=8, family="discrete"
    )

    class Crash(Exception):
        pass

    def crash_at_5(step: int, losses: dict) -> None:
        if step == 5:
            raise Crash

    ref = train(model_cfg, train_cfg, tmp_path / "ref")
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(model_cfg, train_cfg, run, step_hook=crash_at_5)
    assert latest_checkpoint(run)["step"] == 3
    resumed = train(model_cfg, train_cfg, run, resume=True)
    a, b = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "text_loss", "image_loss", "grad_norm"):
            assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (ra["step"], key)
        for key in ("lr", "tokens_seen", "train_flops"):
            assert ra[key] == rb[key], (ra["step"], key)
    for (name, p), q in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert float((p - q).abs().max()) <= 1e-6, name
    assert config_json(run)["resumes"][0]["step"] == 3


# ---------------------------------------------------------------------- generation
def test_generate_writes_a_grid_and_captions_an_image(runs, tmp_path, capsys):
    from PIL import Image

    from transfusion.generation import generate_main

    run = runs["discrete"]
    grid = tmp_path / "grid.png"
    argv = ["--checkpoint", str(run), "--prompt", "a small red circle", "--n", "3", "--out", str(grid)]
    assert generate_main([*argv, "--device", "cpu", "--batch-size", "2"]) == 0
    assert "4x4 VQ codes" in capsys.readouterr().out
    with Image.open(grid) as im:
        assert im.size == (2 * 34 + 2, 2 * 34 + 2)  # 3 images of 32 px in a 2 x 2 grid, 2 px gaps
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    image_args = ["--checkpoint", str(run), "--image", str(tmp_path / "red.png"), "--max-new-tokens", "6"]
    assert generate_main([*image_args, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_the_generation_api_takes_a_discrete_run(runs):
    from transfusion.baseline import DiscreteLM
    from transfusion.generation import caption, generate, load_run, text_to_image

    run = load_run(runs["discrete"])
    assert run.family == "discrete" and isinstance(run.model, DiscreteLM)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    prompts = ["a small red circle", "a large blue square"]
    codes = text_to_image(run.model, prompts, tokenizer=run.tokenizer, generator=gens(5, 6))
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < K
    alone = text_to_image(run.model, prompts[1:], tokenizer=run.tokenizer, generator=gens(6))
    assert torch.equal(alone[0], codes[1])  # per-row generators: batched == alone
    images = text_to_image(
        run.model,
        prompts,
        tokenizer=run.tokenizer,
        autoencoder=run.autoencoder,
        generator=1,
        guidance_scale=None,
    )
    assert images.shape == (2, 3, 32, 32) and float(images.abs().max()) <= 1.0
    texts = caption(run.model, codes, tokenizer=run.tokenizer, max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(x, str) for x in texts)
    ids = caption(run.model, images, autoencoder=run.autoencoder, max_new_tokens=5)
    assert all(0 <= i < run.tokenizer.vocab_size for c in ids for i in c)
    with pytest.raises(ValueError, match="VQ codes"):
        caption(run.model, images)  # images need the VQ autoencoder
    with pytest.raises(TypeError, match="text_to_image / caption"):
        generate(run.model, [[1, 70, 71]])  # the mixed-modal decoder is Transfusion's
