"""bench.quick: the quick profile end to end with a drastically reduced configuration (CPU, seconds)."""

import csv
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from bench import quick  # noqa: E402
from tests.tiny_quick import TINY_QUICK  # noqa: E402
from transfusion.generation import load_run, text_to_image  # noqa: E402

TINY = {**TINY_QUICK, "threads": 1, "progress": False}


def _config(tmp_path, **changes):
    return quick.QuickConfig.from_dict({**TINY, "cache_dir": str(tmp_path / "cache"), **changes})


def test_quick_pipeline_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "quick"
    res = quick.run_quick(out, _config(tmp_path))
    assert {n: r["status"] for n, r in res["stages"].items()} == {
        "train_transfusion": "ok",
        "train_discrete": "ok",
        "eval_transfusion": "ok",
        "eval_discrete": "ok",
        "curve_transfusion": "ok",
        "curve_discrete": "ok",
        "parity": "ok",
        "references": "ok",
        "plots": "ok",
        "curve_plot": "ok",
    }
    rows = {r["family"]: r for r in res["families"]}
    assert set(rows) == {"transfusion", "discrete"}
    for fam, r in rows.items():
        assert r["status"] == "ok" and r["error"] is None
        assert r["steps"] == 4
        assert r["train_flops"] > 0 and r["final_loss"] > 0
        assert 0.0 <= r["t2i_alignment"] <= 1.0 and 0.0 <= r["caption_accuracy"] <= 1.0
        assert 0.0 < r["text_bpb"] < 20.0
        assert r["n_t2i"] == 3 and r["n_caption"] == 3 and r["n_text"] == 6
        assert r["ae_kind"] == ("vae" if fam == "transfusion" else "vq")
        assert r["fid"] > 0 and r["recon_fid"] >= 0  # finite numbers from torch-fidelity (KID needs n > 3)
        captions = json.loads((out / "eval" / f"{fam}.json").read_text())["generated_captions"]
        assert r["caption_empty"] == sum(c.strip() == "" for c in captions) / 3
    assert rows["transfusion"]["final_diffusion_loss"] > 0
    # latent_std_ratio, recomputed through the public API: the same prompts, seed and sampler settings
    assert rows["discrete"]["latent_std_ratio"] is None
    cfg = _config(tmp_path)
    run = load_run(out / "runs" / "transfusion")
    items = quick._test_items(cfg, cfg.n_t2i)
    with torch.no_grad():
        latents = text_to_image(
            run.model,
            [it["caption"] for it in items],
            tokenizer=run.tokenizer,
            generator=cfg.seed,
            num_steps=cfg.num_diffusion_steps,
            guidance_scale=cfg.guidance_scale,
        )
        real = run.autoencoder.encode(torch.stack([it["image"] for it in items]))
    assert rows["transfusion"]["latent_std_ratio"] == pytest.approx(
        float(latents.std() / real.std()), rel=1e-5
    )
    # compute curves: one point per kept checkpoint (4 steps, 4 curve points), FLOPs increasing; the last
    # point is the final model with the evaluation's prompts and seed, so it reproduces every metric
    for fam, points in res["curves"].items():
        assert [p["step"] for p in points] == [1, 2, 3, 4]
        flops = [p["train_flops"] for p in points]
        assert all(b > a for a, b in zip(flops, flops[1:])) and flops[-1] == rows[fam]["train_flops"]
        for metric in ("text_bpb", "caption_accuracy", "t2i_alignment", "fid"):
            assert points[-1][metric] == pytest.approx(rows[fam][metric], rel=1e-6), (fam, metric)
    for metric in ("text_bpb", "caption_accuracy", "t2i_alignment", "fid"):
        par = res["parity"][metric]
        assert par["kind"] in ("exact", "at_most", "more_than") and par["ratio"] > 0
        assert rows["transfusion"][f"parity_{metric}"] == par["display"]
        assert rows["discrete"][f"parity_{metric}"] is None
    refs = res["references"]
    assert refs["ground_truth_t2i_alignment"] >= 0.99
    assert refs["shuffled_t2i_alignment"] < 0.5

    with open(out / "quick.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["family"] for r in table] == ["transfusion", "discrete"]
    assert tuple(table[0]) == quick.CSV_FIELDS
    stored = json.loads((out / "quick.json").read_text())
    assert stored["families"] == res["families"]
    prov = json.loads((out / "quick_provenance.json").read_text())
    assert prov["seed"] == 0 and prov["profile"] == "quick" and "commit" in prov
    for name in (
        "loss_vs_flops",
        "metrics_vs_flops",
        "samples_transfusion",
        "samples_discrete",
        "judge_accuracy",
    ):
        png = out / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"

    # rerun: finished training and evaluation are reused, numbers unchanged
    again = quick.run_quick(out, _config(tmp_path))
    for name in (
        "train_transfusion",
        "train_discrete",
        "eval_transfusion",
        "eval_discrete",
        "curve_discrete",
    ):
        assert again["stages"][name]["status"] == "reused"
    assert again["families"] == res["families"]

    # other weights under the same configuration (a fresh clone trains its own): evaluated afresh. The
    # discrete run's final checkpoint is replaced by its step-3 weights, a valid but different model.
    ckpt = out / "runs" / "discrete" / "checkpoints"
    final = ckpt / "step_00000004.safetensors"
    kept = final.read_bytes()
    final.write_bytes((ckpt / "step_00000003.safetensors").read_bytes())
    swapped = quick.run_quick(out, _config(tmp_path))
    assert swapped["stages"]["eval_discrete"]["status"] == "ok"
    assert swapped["stages"]["curve_discrete"]["status"] == "ok"
    assert swapped["stages"]["eval_transfusion"]["status"] == "reused"
    final.write_bytes(kept)

    # more steps: the run is resumed from its checkpoint, not restarted
    longer = quick.run_quick(out, _config(tmp_path, steps=6))
    assert longer["stages"]["train_transfusion"]["status"] == "ok"
    metrics = [
        json.loads(x) for x in (out / "runs" / "transfusion" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [1, 2, 4, 6]
    assert {r["family"]: r["steps"] for r in longer["families"]} == {"transfusion": 6, "discrete": 6}


def test_clip_sample_range_reaches_the_sampler_and_is_checked_up_front(tmp_path):
    """The last DDPM step lands on the clamped x_0 estimate, so every generated latent lies in [-r, r]."""
    r = 0.05
    res = quick.run_quick(tmp_path / "q", _config(tmp_path, families=("transfusion",), clip_sample_range=r))
    ev = json.loads((tmp_path / "q" / "eval" / "transfusion.json").read_text())
    assert ev["t2i_latents"]["std"] <= r
    (row,) = res["families"]
    assert row["latent_std_ratio"] == pytest.approx(ev["t2i_latents"]["std"] / ev["t2i_latents"]["real_std"])
    with pytest.raises(ValueError, match="clip_sample_range = 0 must be None or a finite number > 0"):
        _config(tmp_path, clip_sample_range=0)


def test_eval_split_picks_the_prompts_and_keys_the_cache(tmp_path):
    """eval_split="val" draws the evaluation's items from the shapes val split (other captions than the
    test split's), is part of the evaluation's cache fingerprint, and leaves the default's unchanged."""
    test_cfg, val_cfg = _config(tmp_path), _config(tmp_path, eval_split="val")
    test_caps = [it["caption"] for it in quick._test_items(test_cfg, 16)]
    val_caps = [it["caption"] for it in quick._test_items(val_cfg, 16)]
    assert len(val_caps) == 16 and val_caps != test_caps
    assert "eval_split" not in quick.eval_settings(test_cfg)  # earlier caches of the test split stay valid
    assert quick.eval_settings(val_cfg) == {**quick.eval_settings(test_cfg), "eval_split": "val"}
    with pytest.raises(ValueError, match="QuickConfig.eval_split = 'holdout' must be one of"):
        _config(tmp_path, eval_split="holdout")


def test_baseline_guidance_scale_reaches_only_the_baseline_sampler(tmp_path, monkeypatch):
    """baseline_guidance_scale sets the discrete baseline's guidance alone (Transfusion keeps
    guidance_scale), enters the evaluation fingerprint only when set, and is checked up front."""
    import transfusion.baseline_sampling as baseline_sampling
    import transfusion.generation as generation

    seen = {}

    class Stop(Exception):
        pass

    def fake_baseline(model, prompts, *, cfg_scale, **kwargs):
        seen["discrete"] = cfg_scale
        raise Stop

    def fake_transfusion(model, prompts, *, guidance_scale, **kwargs):
        seen["transfusion"] = guidance_scale
        raise Stop

    monkeypatch.setattr(baseline_sampling, "generate_images", fake_baseline)
    monkeypatch.setattr(generation, "text_to_image", fake_transfusion)
    monkeypatch.setattr("transfusion.train.special_tokens", lambda tok: None)
    lm = quick._Loaded(None, type("Tok", (), {"encode": lambda self, p: [1]})(), None, 0)
    for base, want in ((None, 3.0), (1.0, 1.0), (5.0, 5.0)):
        cfg = _config(tmp_path, guidance_scale=3.0, baseline_guidance_scale=base)
        for family in ("transfusion", "discrete"):
            with pytest.raises(Stop):
                quick._generate_images(cfg, family, lm, ["a red square"])
        assert seen == {"transfusion": 3.0, "discrete": want}, base
    default, one = _config(tmp_path), _config(tmp_path, baseline_guidance_scale=1.0)
    assert "baseline_guidance_scale" not in quick.eval_settings(default)  # earlier caches stay valid
    assert quick.eval_settings(one) == {**quick.eval_settings(default), "baseline_guidance_scale": 1.0}
    for bad in (float("nan"), "3", True):
        with pytest.raises(ValueError, match="QuickConfig.baseline_guidance_scale = .* must be a finite"):
            _config(tmp_path, baseline_guidance_scale=bad)
    with pytest.raises(ValueError, match="QuickConfig.guidance_scale = None must be a finite"):
        _config(tmp_path, guidance_scale=None)


def test_a_failing_stage_is_recorded_and_the_rest_continues(tmp_path, monkeypatch):
    real = quick._generate_images

    def broken(cfg, family, lm, prompts, **options):
        if family == "discrete":
            raise RuntimeError("sampler exploded")
        return real(cfg, family, lm, prompts, **options)

    monkeypatch.setattr(quick, "_generate_images", broken)
    out = tmp_path / "quick"
    res = quick.run_quick(out, _config(tmp_path, families=("transfusion", "discrete")))
    st = res["stages"]
    assert st["eval_discrete"]["status"] == "failed"
    assert "sampler exploded" in st["eval_discrete"]["error"]
    assert st["eval_transfusion"]["status"] == "ok" and st["plots"]["status"] == "ok"
    rows = {r["family"]: r for r in res["families"]}
    assert rows["transfusion"]["status"] == "ok"
    assert rows["discrete"]["status"] == "partial"
    assert "sampler exploded" in rows["discrete"]["error"]
    assert rows["discrete"]["final_loss"] > 0 and rows["discrete"]["t2i_alignment"] is None
    assert (out / "quick.csv").is_file() and (out / "plots" / "samples_transfusion.png").is_file()


def test_main_writes_results_and_rejects_bad_options(tmp_path, capsys):
    out = tmp_path / "q"
    args = [
        "--out",
        str(out),
        "--families",
        "transfusion",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "c"),
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    for key, value in TINY.items():
        if key != "progress":
            args += ["--set", f"{key}={json.dumps(value)}"]
    assert quick.main(args) == 0
    assert "transfusion" in capsys.readouterr().out
    assert [r["family"] for r in json.loads((out / "quick.json").read_text())["families"]] == ["transfusion"]
    assert (tmp_path / "runs" / "transfusion" / "metrics.jsonl").is_file() and not (out / "runs").exists()
    with pytest.raises(SystemExit):
        quick.main(["--families", "nope"])
    with pytest.raises(SystemExit):
        quick.main(["--set", "no_such_key=1"])
