"""bench.eval_noise: the spreads against numpy's two-way reading, and a reduced run against the study's own
evaluation."""

import json
import random

import numpy as np
import pytest

from bench import eval_noise, study
from bench.quick import QuickConfig, eval_settings
from tests.tiny_quick import TINY_QUICK

TINY = {**TINY_QUICK, "curve_points": 1}


def _line(seed: int, eval_seed: int, **metrics: float | None) -> dict:
    return {"group": "g", "label": "row", "training": "t", "seed": seed, "eval_seed": eval_seed,
            "status": "ok", **metrics}  # fmt: skip


def _numpy_two_way(table: np.ndarray) -> dict[str, float]:
    """The crossed design's mean squares, the textbook way (rows: training seeds, columns: eval seeds)."""
    n_s, n_e = table.shape
    rows, cols, grand = table.mean(axis=1), table.mean(axis=0), table.mean()
    ms_seed = n_e * ((rows - grand) ** 2).sum() / (n_s - 1)
    ms_eval = n_s * ((cols - grand) ** 2).sum() / (n_e - 1)
    ms_int = ((table - rows[:, None] - cols[None, :] + grand) ** 2).sum() / ((n_s - 1) * (n_e - 1))
    return {
        "training_std": np.sqrt(max(0.0, (ms_seed - ms_int) / n_e)),
        "pool_std": np.sqrt(max(0.0, (ms_eval - ms_int) / n_s)),
    }


def test_spreads_match_a_numpy_reading_of_the_same_table():
    rng = random.Random()
    n_seeds, eval_seeds = rng.randint(2, 5), [1000 * (i + 1) for i in range(rng.randint(2, 5))]
    table = np.array([[rng.gauss(20, 3) for _ in eval_seeds] for _ in range(n_seeds)])
    lines = [
        _line(s, k, fid=float(table[s, j]), text_bpb=0.1 + 0.2 + s / 100)
        for s in range(n_seeds)
        for j, k in enumerate(eval_seeds)
    ]
    # a training seed that misses one evaluation seed is left out (unbalanced), even with a duplicate
    # line making up the count
    short = [_line(n_seeds, k, fid=99.0, text_bpb=0.5) for k in eval_seeds[:-1]]
    lines += [*short, short[0]]
    got = {r["metric"]: r for r in eval_noise.summarize_noise(lines, metrics=("fid", "text_bpb"))}
    fid = got["fid"]
    assert fid["n_seeds"] == n_seeds and fid["n_eval_seeds"] == len(eval_seeds)
    assert fid["mean"] == pytest.approx(table.mean())
    assert fid["sampling_std"] == pytest.approx(np.sqrt(table.var(axis=1, ddof=1).mean()))
    assert fid["seed_std"] == pytest.approx(table.mean(axis=1).std(ddof=1))
    want = _numpy_two_way(table)
    assert fid["training_std"] == pytest.approx(want["training_std"], abs=1e-12)
    assert fid["pool_std"] == pytest.approx(want["pool_std"], abs=1e-12)
    # the same value under every evaluation seed: no sampling spread, exactly (0.1 + 0.2 is inexact)
    text = got["text_bpb"]
    assert text["sampling_std"] == 0 and text["pool_std"] == 0 and text["n_seeds"] == n_seeds
    assert text["training_std"] == pytest.approx(np.std([0.3 + s / 100 for s in range(n_seeds)], ddof=1))
    # an evaluation seed asked for but never scored leaves no balanced training seed
    none = eval_noise.summarize_noise(lines, eval_seeds=[*eval_seeds, 9999], metrics=("fid",))[0]
    assert none["n_seeds"] == 0 and none["mean"] is None and none["n_eval_seeds"] == len(eval_seeds) + 1


def test_a_shared_noise_pool_is_told_apart_from_the_training_seed():
    """Every training seed meets the same evaluation seeds, whose noise pools shift all models alike. The
    two-way reading finds both effects where a one-way one would call the training spread 0."""
    rng = np.random.default_rng()
    # shared by every training seed: sd 5.16, so the within-row variance (about 26.7 / 4 per row mean)
    # dwarfs any draw of the training variance (about 1) and the one-way reading below is surely < 0
    pools = np.array([-6.0, -2.0, 2.0, 6.0])
    training = rng.normal(0.0, 1.0, size=40)  # each training seed's own effect
    table = 20 + training[:, None] + pools[None, :] + rng.normal(0.0, 0.3, size=(40, 4))
    lines = [_line(s, 1000 * (k + 1), fid=float(table[s, k])) for s in range(40) for k in range(4)]
    got = eval_noise.summarize_noise(lines, metrics=("fid",))[0]
    assert abs(got["training_std"] - training.std(ddof=1)) < 0.15  # worst of 2000 fresh draws: 0.09
    assert abs(got["pool_std"] - pools.std(ddof=1)) < 0.2
    one_way = table.mean(axis=1).var(ddof=1) - table.var(axis=1, ddof=1).mean() / 4
    assert one_way < 0  # what the one-way formula would have clipped to a training spread of 0


def test_one_training_seed_or_one_evaluation_seed_leaves_that_spread_empty():
    one_seed = eval_noise.summarize_noise([_line(0, k, fid=float(k)) for k in (1, 2)], metrics=("fid",))[0]
    assert one_seed["seed_std"] is None and one_seed["training_std"] is None and one_seed["pool_std"] is None
    assert one_seed["sampling_std"] == 0.5**0.5
    one_eval = eval_noise.summarize_noise([_line(s, 1, fid=float(s)) for s in (0, 1)], metrics=("fid",))[0]
    assert one_eval["sampling_std"] is None and one_eval["training_std"] is None
    assert one_eval["seed_std"] == 0.5**0.5


def test_eval_seed_is_validated_and_keys_only_the_evaluations_that_set_it():
    with pytest.raises(ValueError, match="eval_seed = -1"):
        QuickConfig(eval_seed=-1)
    with pytest.raises(ValueError, match="eval_seed = True"):
        QuickConfig(eval_seed=True)
    assert "eval_seed" not in eval_settings(QuickConfig())  # earlier evaluation caches stay valid
    assert eval_settings(QuickConfig(eval_seed=7))["eval_seed"] == 7
    assert QuickConfig(seed=3).sampling_seed == 3 and QuickConfig(seed=3, eval_seed=7).sampling_seed == 7


def test_eval_offset_moves_every_held_out_item_and_keys_only_the_evaluations_that_set_it():
    """An evaluation from eval_offset k reads items k, k+1, ... of its split (prompts, images to caption,
    texts), refuses to run past the split's end, and has a fingerprint and folder of its own; offset 0
    keeps every earlier evaluation's cache."""
    from bench.quick import _test_items
    from bench.study_grid import Row, eval_key
    from transfusion.data import get_dataset

    for bad in (-1, True, "64", 1.5):
        with pytest.raises(ValueError, match="eval_offset"):
            QuickConfig(eval_offset=bad)
    split = get_dataset("shapes", "val")
    k = random.randrange(1, len(split) - 8)
    got = _test_items(QuickConfig(eval_split="val", eval_offset=k), 8)
    assert [it["caption"] for it in got] == [split[k + i]["caption"] for i in range(8)]
    assert [it["caption"] for it in _test_items(QuickConfig(eval_split="val"), 3)] == [
        split[i]["caption"] for i in range(3)
    ]
    with pytest.raises(ValueError, match=f"eval_offset = {len(split) - 4} needs 8 items"):
        _test_items(QuickConfig(eval_split="val", eval_offset=len(split) - 4), 8)
    last = _test_items(QuickConfig(eval_split="val", eval_offset=len(split) - 8), 8)  # the last 8 fit
    assert last[-1]["caption"] == split[len(split) - 1]["caption"]
    # the commands refuse such an offset before anything trains, naming the largest that fits
    from bench.quick import check_eval_items

    fits = len(split) - 500  # n_text, the largest of the three counts by default
    check_eval_items(QuickConfig(eval_split="val", eval_offset=fits))
    with pytest.raises(ValueError, match=f"eval_offset = {fits + 1} needs 500 items .* at most {fits}"):
        check_eval_items(QuickConfig(eval_split="val", eval_offset=fits + 1))
    with pytest.raises(SystemExit):
        study.main(["--set", f"eval_offset={fits + 1}", "--list"])
    assert "eval_offset" not in eval_settings(QuickConfig())  # earlier evaluation caches stay valid
    assert eval_settings(QuickConfig(eval_offset=64))["eval_offset"] == 64
    base = study.StudyConfig(quick={"eval_offset": 64}).base()
    assert eval_key(study.eval_overrides(Row("g", "plain", "base"), base)) == "eval_offset=64"


def test_sampling_seeds_draw_disjoint_image_noise():
    """Each sampling seed gets its own pool of image noises. Seeding row i with seed + i (the first
    rule) gave seed 1's row 0 the noise of seed 0's row 1, so nearby training seeds shared one pool."""
    from types import SimpleNamespace

    import torch

    from bench.quick import IMAGE_POOL_STRIDE, SAMPLING_SEED_LIMIT, _generate_images, image_noise_settings
    from tests.test_generate import tiny
    from transfusion.generation import text_to_image

    lm = SimpleNamespace(model=tiny(), tokenizer=None, autoencoder=SimpleNamespace(decode=lambda z: z))
    prompts, fast = [[10, 11, 12]] * 3, dict(scheduler="ddim", num_diffusion_steps=3, guidance_scale=1.0)
    images = {k: _generate_images(QuickConfig(seed=k, **fast), "transfusion", lm, prompts) for k in range(3)}
    flat = [(k, i, images[k][i]) for k in images for i in range(len(prompts))]
    for a, (k, i, x) in enumerate(flat):
        for k2, i2, y in flat[a + 1 :]:
            assert not torch.allclose(x, y), f"seed {k} row {i} and seed {k2} row {i2} drew the same noise"
    # row i of sampling seed k is seeded k * IMAGE_POOL_STRIDE + i; seed 0 keeps the first rule's rows
    cfg = QuickConfig(seed=2, **fast)
    same = dict(scheduler="ddim", num_steps=3, guidance_scale=None, clip_sample_range=cfg.clip_sample_range)
    alone = text_to_image(lm.model, prompts[:1], generator=2 * IMAGE_POOL_STRIDE + 1, **same)
    torch.testing.assert_close(images[2][1:2], alone, rtol=1e-5, atol=1e-5)
    first_rule = text_to_image(lm.model, prompts, generator=0, **same)
    torch.testing.assert_close(images[0], first_rule, rtol=1e-5, atol=1e-5)
    # only Transfusion's evaluations from seed 1 on are drawn again
    assert image_noise_settings(QuickConfig(seed=0), "transfusion") == {}
    assert image_noise_settings(QuickConfig(seed=1), "discrete") == {}
    assert image_noise_settings(QuickConfig(seed=1), "transfusion") == {"image_row_seed": IMAGE_POOL_STRIDE}
    for bad in (0, IMAGE_POOL_STRIDE + 1, "8", True):
        with pytest.raises(ValueError, match="n_t2i"):
            QuickConfig(n_t2i=bad)
    # torch's CPU generator keeps a seed's low 32 bits: pool k + SAMPLING_SEED_LIMIT would be pool k again,
    # so sampling seeds stop below it, where every pool's rows still fit in 32 bits
    wrap = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (5, 2**32 + 5)]
    assert torch.equal(*wrap)
    assert (SAMPLING_SEED_LIMIT - 1) * IMAGE_POOL_STRIDE + IMAGE_POOL_STRIDE - 1 < 2**32
    assert QuickConfig(eval_seed=SAMPLING_SEED_LIMIT - 1).image_row_seed < 2**32
    assert QuickConfig(seed=10**6, eval_seed=3).sampling_seed == 3  # a large training seed, evaluated apart
    for fields, message in (({"seed": SAMPLING_SEED_LIMIT}, "QuickConfig.seed = 4096"),
                            ({"eval_seed": 5000}, "QuickConfig.eval_seed = 5000")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            QuickConfig(**fields)


def _uncorrelated_normal_rows(x, rows: int) -> bool:
    """Whether two pools of ``rows`` noise rows each (stacked in ``x``) read as independent standard
    normal draws: the values' mean and std, and the mean |correlation| of row pairs within the first pool
    and across the two against its expectation for independent rows (6 standard errors); no near-copies."""
    import torch

    x = x.reshape(2 * rows, -1).double()
    d = x.shape[1]
    if abs(x.std().item() - 1.0) > 0.03 or abs(x.mean().item()) > 0.04:
        return False
    corr = torch.corrcoef(x).abs()
    # E|r| of two independent normal vectors of length d, and the sd of one |r|
    expected, sd_one = (2 / (torch.pi * (d - 1))) ** 0.5, ((1 - 2 / torch.pi) / (d - 1)) ** 0.5
    upper = torch.triu(torch.ones(rows, rows, dtype=torch.bool), 1)
    for values in (corr[:rows, :rows][upper], corr[:rows, rows:].flatten()):
        if abs(values.mean().item() - expected) > 6 * sd_one / values.numel() ** 0.5 or values.max() > 0.4:
            return False
    return True


def test_noise_pools_hold_uncorrelated_standard_normal_rows():
    """No pool is less diverse than chance: the rows of two pools (64 prompts each, and 256 for a few),
    drawn as the decoder draws them, read as independent standard normals, within a pool and across the
    two. (A rule whose nearby integer seeds gave correlated rows would give its images less spread, and
    FID would read worse for it.) Every one of the 4096 pools is checked."""
    import torch

    from bench.quick import SAMPLING_SEED_LIMIT
    from transfusion.generation.sampling import row_generators

    def pool(seed: int, rows: int = 64) -> torch.Tensor:
        return torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in row_generators(seed, rows)])

    # every pool a sampling seed may draw, paired at random with another
    seeds = random.sample(range(SAMPLING_SEED_LIMIT), SAMPLING_SEED_LIMIT)
    for k1, k2 in zip(seeds[::2], seeds[1::2]):
        pools = [pool(QuickConfig(eval_seed=k).image_row_seed) for k in (k1, k2)]
        assert _uncorrelated_normal_rows(torch.cat(pools), 64), (k1, k2)
    # and a few at the 256 rows of a --set n_t2i=256 evaluation
    for k1, k2 in zip(seeds[:8:2], seeds[1:8:2]):
        pools256 = [pool(QuickConfig(eval_seed=k).image_row_seed, 256) for k in (k1, k2)]
        assert _uncorrelated_normal_rows(torch.cat(pools256), 256), (k1, k2)
    # the check can fail: a pool whose rows mix in a shared draw, or repeat one another
    shared = torch.randn(1, 4, 8, 8)
    assert not _uncorrelated_normal_rows(torch.cat([(pools[0] + 0.3 * shared) / 1.044, pools[1]]), 64)
    assert not _uncorrelated_normal_rows(torch.cat([pools[0][:32].repeat(2, 1, 1, 1), pools[1]]), 64)


def test_cli_refuses_bad_evaluation_seeds(capsys):
    for argv, message in (
        (["--eval-seeds", "1000,1000"], "distinct integers"),
        (["--eval-seeds", "1000"], "at least two"),
        (["--eval-seeds=5,-1"], "from 0 to 4095"),
        (["--eval-seeds", "1000,5000"], "from 0 to 4095"),
        (["--eval-seeds", "a"], "comma-separated integers"),
        (["--set", "eval_seed=3"], "use --eval-seeds"),
        (["--groups", "nope"], "nope"),
    ):
        with pytest.raises(SystemExit):
            eval_noise.main(argv)
        assert message in capsys.readouterr().err


def test_reduced_run_reuses_the_study_training_and_leaves_its_evaluations_alone(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    quick_cfg = {**TINY, "cache_dir": str(tmp_path / "cache")}
    cfg = study.StudyConfig(groups=("cfg_scale",), seeds=(0,), workers=1, quick=quick_cfg)
    runs = tmp_path / "runs"
    study_lines = study.run_study(tmp_path / "study", cfg, runs, progress=False)["runs"]
    base = {ln["label"]: ln for ln in study_lines}
    run_dir = runs / "base" / "seed0"
    before = {p: p.read_bytes() for p in (run_dir / "eval").rglob("*.json")}
    assert len(before) >= 3  # the study's three evaluations (guidance 1, 3, 5)
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="distinct integers"):
        eval_noise.run_eval_noise(tmp_path / "out", cfg, (7, 7), runs, progress=False)
    # other training settings would make the trainer discard the study's run: refused, nothing lost
    other = study.StudyConfig(groups=("cfg_scale",), seeds=(0,), workers=1, quick={**quick_cfg, "lr": 5e-4})
    with pytest.raises(ValueError, match="trained with other settings"):
        eval_noise.run_eval_noise(tmp_path / "out", other, (0, 7), runs, progress=False)
    assert sorted((run_dir / "checkpoints").iterdir()) == ckpts
    res = eval_noise.run_eval_noise(tmp_path / "out", cfg, (0, 7), runs, progress=False)
    assert sorted((run_dir / "checkpoints").iterdir()) == ckpts  # the training was reused
    assert {p: p.read_bytes() for p in before} == before  # the study's evaluations are untouched
    assert any("eval_seed=7" in p.name for p in (run_dir / "eval").iterdir())
    lines = res["runs"]
    assert len(lines) == 3 * 2 and all(ln["status"] == "ok" for ln in lines), [ln["error"] for ln in lines]
    by = {(ln["label"], ln["eval_seed"]): ln for ln in lines}
    for label, ln in base.items():
        # evaluation seed 0 is the training seed's own sampling: the study's numbers, recomputed
        assert by[(label, 0)]["fid"] == ln["fid"] and by[(label, 0)]["t2i_alignment"] == ln["t2i_alignment"]
        assert by[(label, 7)]["fid"] != ln["fid"]  # another sampling seed, other images
        assert by[(label, 7)]["text_bpb"] == ln["text_bpb"]  # bits per byte draw no samples
        assert by[(label, 7)]["caption_accuracy"] == ln["caption_accuracy"]  # greedy captions
    text = [r for r in res["summary"] if r["metric"] == "text_bpb"]
    assert len(text) == 3 and all(r["sampling_std"] == 0 for r in text)
    out = tmp_path / "out"
    for name in ("eval_noise.json", "eval_noise.csv", "eval_noise_summary.csv", "eval_noise_provenance.json"):
        assert (out / name).is_file()
    assert (out / "plots" / "eval_noise.png").is_file() and "plots_error" not in res
    prov = json.loads((out / "eval_noise_provenance.json").read_text())
    assert prov["eval_seeds"] == [0, 7] and prov["profile"] == "eval_noise"
    from bench.report import build_report

    report = build_report(tmp_path).read_text()
    assert "## Evaluation noise (out)" in report and "![eval_noise](out/plots/eval_noise.png)" in report
    text_row = next(r for r in text if r["label"] == "guidance 3")
    # one training seed: no seed, training or pool spread; two evaluation seeds, no sampling spread
    assert f"| cfg_scale | guidance 3 | text_bpb | 1 | 2 | {text_row['mean']:.3g} | 0 | - | - | - |" in report
    again = eval_noise.run_eval_noise(tmp_path / "out", cfg, (0, 7), runs, progress=False)
    assert [ln["fid"] for ln in again["runs"]] == [ln["fid"] for ln in lines]  # reused, the same
