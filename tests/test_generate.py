"""Generation: KV-cached decoding vs recomputation, seeding, CFG, prompt checks, batching, API and CLI.

All models are tiny and randomly initialised (4 image positions per image, a few sampler steps).
Random models rarely sample <BOI>, so ``boi_when`` makes some positions open an image: it adds a large
bonus to <BOI>'s logit whenever the first hidden feature is above a threshold, a deterministic function of
the state, so every path (cached, recomputed, batched, alone) sees the same decisions.
"""

from __future__ import annotations

import json

import pytest
import torch

from transfusion.config import get_preset
from transfusion.generation import (
    DEFAULT_STEPS,
    SamplingConfig,
    caption,
    generate,
    generate_main,
    make_scheduler,
    text_to_image,
)
from transfusion.packing import SpecialTokens, pack_documents
from transfusion.train import TrainConfig
from transfusion.transfusion_model import Transfusion

SP = SpecialTokens()
BOS, EOS, BOI, EOI = SP.bos, SP.eos, SP.boi, SP.eoi
FAST = dict(scheduler="ddim", num_steps=3)


def tiny(seed: int = 0, **overrides) -> Transfusion:
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, latent_size=4, max_seq_len=48)
    kw.update(overrides)
    return Transfusion(get_preset("tiny", **kw)).eval()


def boi_when(model: Transfusion, threshold: float = 0.8) -> Transfusion:
    """Make the model open images at some positions (see the module docstring)."""
    plain = model.lm_logits

    def lm_logits(h: torch.Tensor) -> torch.Tensor:
        logits = plain(h).clone()
        logits[..., BOI] += torch.where(h[..., 0] > threshold, 50.0, -50.0)
        return logits

    model.lm_logits = lm_logits
    return model


@pytest.fixture(scope="module")
def model() -> Transfusion:
    return tiny()


def latent(seed: int) -> torch.Tensor:
    return torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(seed))


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def mixed_prompts() -> list:
    return [
        [[BOS, 10, 11, 12, BOI]],  # opens an image right away (text-to-image)
        [[BOS, 20, 21, 22, 23, 24, 25, 26, 27]],  # text only, longest
        [[BOS], latent(1), [30]],  # image-first (captioning) with one caption token
        [[40]],  # shortest: <BOS> is added
    ]


def collect(model, prompts, **options):
    trace: list[dict] = []
    out = generate(model, prompts, trace=trace.append, **options)
    return out, trace


def assert_same_generations(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.finish_reason == y.finish_reason
        assert x.tokens == y.tokens
        assert len(x.images) == len(y.images)
        for p, q in zip(x.images, y.images):
            torch.testing.assert_close(p, q, atol=atol, rtol=0)


# ====================================================================== KV cache == recomputation
@pytest.mark.parametrize(
    "overrides",
    [{}, {"adapter": "unet", "unet_channels": (8, 16)}, {"causal_only_images": True}],
    ids=["linear", "unet", "causal_only"],
)
def test_cached_decoding_matches_recomputation(overrides):
    m = boi_when(tiny(**overrides))
    opts = dict(temperature=0.0, guidance_scale=2.0, max_new_tokens=6, max_images=1, **FAST)
    cached, tc = collect(m, mixed_prompts(), generator=gens(0, 1, 2, 3), **opts)
    plain, tp = collect(m, mixed_prompts(), generator=gens(0, 1, 2, 3), use_cache=False, **opts)
    assert len(tc) == len(tp) and len(tc) > 10
    kinds = {e["kind"] for e in tc}
    assert kinds == {"logits", "eps"}
    for a, b in zip(tc, tp):
        assert (a["kind"], a["rows"]) == (b["kind"], b["rows"])
        if a["kind"] == "logits":
            torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=0)
        else:
            assert a["t"] == b["t"]
            for key in ("x_t", "eps_cond", "eps_uncond", "eps"):
                torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert_same_generations(cached, plain)
    # Images were generated both at the start (row 0) and mid-generation by some text rows.
    assert len(cached[0].images) == 1
    assert sum(len(g.images) for g in cached[1:]) >= 1


def test_cached_decoding_matches_the_training_forward(model):
    """Independent reference: the model's training-time embedding + layout of the finished document."""
    cap = [BOS, 10, 11, 12]
    trace: list[dict] = []
    (g,) = generate(
        model,
        [[[*cap, BOI]]],
        generator=gens(0),
        trace=trace.append,
        temperature=0.0,
        guidance_scale=None,
        scheduler="ddpm",
        num_steps=3,
        max_new_tokens=4,
        allow_images=False,
    )
    n = model.cfg.patches_per_image
    eps_steps = [e for e in trace if e["kind"] == "eps"]
    after = [e for e in trace if e["kind"] == "logits"]
    assert len(eps_steps) == 3 and len(after) >= 1

    def full_forward(doc, latents, t):
        batch = pack_documents(
            [doc], seq_len=sum(len(s) if isinstance(s, list) else n + 2 for s in doc), patch_size=2
        )
        x, ctx = model.embed(batch.tokens, batch.patch_index(), latents, t)
        h = model.run_transformer(x, batch.layout, positions=batch.positions)
        return batch, h, ctx

    with torch.no_grad():
        for e in eps_steps:  # each denoising step: eps of the image given the caption prefix
            batch, h, ctx = full_forward([cap, e["x_t"][0]], e["x_t"], torch.tensor([e["t"]]))
            eps = model.adapter.decode(h.flatten(0, 1)[batch.patch_index()], ctx)
            torch.testing.assert_close(e["eps_cond"], eps, atol=1e-5, rtol=0)
        # After the image: the clean latents at t = 0, then <EOI> and the sampled text.
        doc = g.document
        assert isinstance(doc[1], torch.Tensor) and doc[0] == cap
        batch, h, _ = full_forward(doc, doc[1][None], torch.zeros(1, dtype=torch.long))
        eoi = len(cap) + 1 + n
        assert int(batch.tokens[0, eoi]) == EOI
        ref = model.lm_logits(h[0, eoi : eoi + len(after)])
        torch.testing.assert_close(torch.stack([e["logits"] for e in after]), ref, atol=1e-5, rtol=0)


# ====================================================================== seeds, CFG, batching
def test_a_seed_reproduces_images_and_text():
    m = boi_when(tiny())
    opts = dict(temperature=1.0, top_k=20, guidance_scale=2.0, max_new_tokens=5, max_images=1)
    opts.update(scheduler="ddpm", num_steps=4)
    a = generate(m, mixed_prompts(), generator=7, **opts)
    b = generate(m, mixed_prompts(), generator=7, **opts)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.finish_reason == y.finish_reason
        assert all(torch.equal(p, q) for p, q in zip(x.images, y.images))
    c = generate(m, mixed_prompts(), generator=8, **opts)
    assert [x.tokens for x in a] != [x.tokens for x in c]
    assert not torch.equal(a[0].images[0], c[0].images[0])
    # One torch.Generator: per-row seeds are drawn from it, so its seed alone fixes the result.
    d = generate(m, mixed_prompts(), generator=torch.Generator().manual_seed(3), **opts)
    e = generate(m, mixed_prompts(), generator=torch.Generator().manual_seed(3), **opts)
    assert torch.equal(d[0].images[0], e[0].images[0]) and [x.tokens for x in d] == [x.tokens for x in e]


def test_guidance_scale_one_equals_conditional_sampling(model):
    prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25]]
    kw = dict(scheduler="ddpm", num_steps=4)
    cond = text_to_image(model, prompts, generator=gens(0, 1), guidance_scale=None, **kw)
    one = text_to_image(model, prompts, generator=gens(0, 1), guidance_scale=1.0, **kw)
    torch.testing.assert_close(one, cond, atol=1e-5, rtol=0)
    three = text_to_image(model, prompts, generator=gens(0, 1), guidance_scale=3.0, **kw)
    assert (three - cond).abs().max() > 1e-3


def test_unconditional_prompt_is_the_caption_dropped_training_form(model):
    """The unconditional rows of CFG are <BOS> <BOI>: what caption dropout leaves in training."""
    trace: list[dict] = []
    generate(model, [[BOS, 10, 11, BOI]], generator=gens(0), trace=trace.append, guidance_scale=2.0, **FAST)
    plain: list[dict] = []
    generate(model, [[BOS, BOI]], generator=gens(0), trace=plain.append, guidance_scale=None, **FAST)
    first = next(e for e in trace if e["kind"] == "eps")
    ref = next(e for e in plain if e["kind"] == "eps")
    torch.testing.assert_close(first["x_t"], ref["x_t"], atol=0, rtol=0)
    torch.testing.assert_close(first["eps_uncond"], ref["eps_cond"], atol=1e-5, rtol=0)
    # And it matches packing's caption dropout of the training document.
    doc = [[BOS, 10, 11], torch.zeros(4, 4, 4), [EOS]]
    dropped = pack_documents([doc], seq_len=16, patch_size=2, caption_dropout=1.0)
    assert dropped.tokens[0, :2].tolist() == [BOS, BOI]


def test_batched_generation_equals_generating_each_alone():
    m = boi_when(tiny())
    opts = dict(temperature=1.0, top_k=16, guidance_scale=2.0, max_new_tokens=6, max_images=1)
    opts.update(scheduler="ddpm", num_steps=3)
    prompts = mixed_prompts()
    batched = generate(m, prompts, generator=gens(10, 11, 12, 13), **opts)
    alone = [generate(m, [p], generator=gens(10 + i), **opts)[0] for i, p in enumerate(prompts)]
    assert_same_generations(batched, alone)
    assert sum(len(g.images) for g in batched) >= 2
    lat = text_to_image(m, [[10], [20, 21, 22, 23, 24]], generator=gens(5, 6), **FAST)
    for i, p in enumerate([[10], [20, 21, 22, 23, 24]]):
        torch.testing.assert_close(
            lat[i], text_to_image(m, [p], generator=gens(5 + i), **FAST)[0], atol=1e-5, rtol=0
        )


# ====================================================================== bad input
def _long(model) -> list[int]:
    return [BOS] + [10] * model.cfg.max_seq_len


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "prompts is empty"),
        ([[]], "prompts[0] is empty"),
        ([[[]]], "prompts[0] is empty"),
        ("a red circle", "one prompt (a list of segments) per row"),
        (["a red circle"], "prompts[0] is a string"),
        ([[BOS] + [10] * 60], "longer than the context max_seq_len = 48"),
        ([[BOS] + [10] * 42 + [BOI]], "do not fit in max_seq_len"),
        ([[BOS, 10, 64]], "token id 64 is outside the vocabulary [0, vocab_size = 64)"),
        ([[BOS, -1]], "token id -1 is outside the vocabulary"),
        ([[BOS, 10, 0, 11]], "<PAD>"),
        ([[BOS, 10, EOI]], "<EOI> (id 4) is inserted after each image"),
        ([[BOS, BOI, 10]], "<BOI> (id 3) may only be the last token"),
        ([[BOS, 10, EOS]], "<EOS> (id 2) ends a document"),
        ([[10, BOS]], "<BOS> (id 1) may only start a prompt"),
        ([[[BOS], torch.zeros(3, 4, 4)]], "image latents have shape (3, 4, 4); the model needs (4, 4, 4)"),
        ([[[BOS], torch.full((4, 4, 4), float("nan"))]], "NaN"),
        ([[[BOS], "text"]], "a segment must be token ids"),
        ([[BOS, 1.5]], "must be integers"),
    ],
)
def test_bad_prompts_are_rejected_naming_the_problem(model, prompts, message):
    with pytest.raises(ValueError) as e:
        generate(model, prompts, max_new_tokens=2)
    assert message in str(e.value)


def test_tokenizer_vocabulary_limit_is_enforced(model):
    with pytest.raises(ValueError, match=r"token id 40 is outside the tokenizer's vocabulary \[0, 32\)"):
        generate(model, [[BOS, 40]], vocab_limit=32)
    out = generate(model, [[BOS, 10]], vocab_limit=32, max_new_tokens=12, generator=0, allow_images=False)
    assert all(t < 32 for t in out[0].tokens)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1.0}, "temperature = -1.0"),
        ({"top_k": 0}, "top_k = 0"),
        ({"scheduler": "euler"}, "scheduler = 'euler'"),
        ({"num_steps": 0}, "num_steps = 0"),
        ({"max_new_tokens": -1}, "max_new_tokens = -1"),
        ({"guidance_scale": float("inf")}, "guidance_scale = inf"),
        ({"eta": 0.5}, "eta = 0.5 is a DDIM option"),
        ({"clip_sample_range": 0.0}, "clip_sample_range = 0.0 must be None or a finite number > 0"),
        ({"clip_sample_range": float("nan")}, "clip_sample_range = nan"),
        ({"steps": 3}, "unknown sampling option(s) ['steps']"),
    ],
)
def test_bad_sampling_options_are_rejected(model, options, message):
    with pytest.raises(ValueError) as e:
        generate(model, [[BOS, 10]], **options)
    assert message in str(e.value)
    with pytest.raises(ValueError, match="2 generators for 1 prompts"):
        generate(model, [[BOS, 10]], generator=gens(0, 1))


# ====================================================================== sampling and stopping
def test_sampling_modes_and_stop_reasons(model):
    greedy = generate(model, [[BOS, 10]], temperature=0.0, max_new_tokens=6, allow_images=False)[0]
    top1 = generate(model, [[BOS, 10]], temperature=1.5, top_k=1, max_new_tokens=6, allow_images=False)[0]
    assert greedy.tokens == top1.tokens and greedy.finish_reason == "max_new_tokens"
    assert greedy.num_tokens == 6 and not ({0, BOS, BOI, EOI} & set(greedy.tokens))
    # The context fills up: the row stops at max_seq_len (48 positions).
    (full,) = generate(model, [[BOS] + [10] * 40], temperature=0.0, max_new_tokens=20, allow_images=False)
    assert full.finish_reason == "max_seq_len" and full.num_tokens == 7
    # <EOS> ends a row; an image that does not fit is not started.
    m = tiny()
    plain = m.lm_logits
    m.lm_logits = lambda h: plain(h) + 50.0 * torch.nn.functional.one_hot(torch.tensor(EOS), 64)
    (eos,) = generate(m, [[BOS, 10]], max_new_tokens=5)
    assert eos.tokens == [EOS] and eos.finish_reason == "eos"
    m.lm_logits = lambda h: plain(h) + 50.0 * torch.nn.functional.one_hot(torch.tensor(BOI), 64)
    (room,) = generate(m, [[BOS] + [10] * 42], max_new_tokens=5, **FAST)
    assert room.finish_reason == "max_seq_len" and room.images == []
    (two,) = generate(m, [[BOS, 10]], max_new_tokens=5, max_images=2, temperature=0.0, **FAST)
    assert len(two.images) == 2 and two.num_tokens == 5


def test_scheduler_matches_the_training_schedule(model):
    assert DEFAULT_STEPS == {"ddpm": 250, "ddim": 50}
    assert SamplingConfig().steps == 250 and SamplingConfig(scheduler="ddim").steps == 50
    for name in ("ddpm", "ddim"):
        s = make_scheduler(name, 1000, SamplingConfig(scheduler=name).steps, schedule=model.schedule)
        assert s.config.prediction_type == "epsilon" and s.config.beta_schedule == "squaredcos_cap_v2"
        steps = DEFAULT_STEPS[name]
        assert len(s.timesteps) == steps and int(s.timesteps[0]) == 1000 - 1000 // steps
        torch.testing.assert_close(s.alphas_cumprod, model.schedule.alphas_cumprod)


def gaussian_oracle(m: Transfusion, mu: float, sigma: float) -> Transfusion:
    """Replace ``m``'s network output by the best prediction for latents x0 ~ N(mu, sigma^2), a closed form:
    E[eps | x_t] = sqrt(1 - a_t) (x_t - sqrt(a_t) mu) / (a_t sigma^2 + 1 - a_t), and under v-prediction
    E[v | x_t] = sqrt(a_t) E[eps | x_t] - sqrt(1 - a_t) E[x0 | x_t], E[x0 | x_t] from E[eps | x_t]."""
    alphas = m.schedule.alphas_cumprod.double()
    seen: dict[str, torch.Tensor] = {}
    encode = m.adapter.encode

    def spy(x_t, t):  # what the model is shown: the noisy latents and their timesteps
        seen["x"], seen["t"] = x_t.double(), t
        return encode(x_t, t)

    def exact(hidden, ctx):
        a, x = alphas[seen["t"]].view(-1, 1, 1, 1), seen["x"]
        eps = torch.sqrt(1 - a) * (x - a.sqrt() * mu) / (a * sigma**2 + 1 - a)
        if m.cfg.prediction_type == "epsilon":
            return eps.float()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()

    m.adapter.encode, m.adapter.decode = spy, exact
    return m


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_sampling_with_the_exact_eps_of_gaussian_data_recovers_it(scheduler):
    """The whole image loop (timesteps the model sees, scheduler set-up, CFG, steps) against a known answer:
    fed the exact eps of Gaussian latents (``gaussian_oracle``) in place of the network, the sampler's
    samples must come out with mean mu and standard deviation sigma."""
    mu, sigma = 0.7, 0.5
    m = gaussian_oracle(tiny(seed=5), mu, sigma)
    prompts = [[10, 11, 12]] * 32
    x = text_to_image(
        m, prompts, generator=gens(*range(32)), guidance_scale=3.0, scheduler=scheduler, num_steps=250
    )
    assert x.shape == (32, 4, 4, 4)
    assert abs(x.mean().item() - mu) < 0.04 and abs(x.std().item() - sigma) < 0.03
    # a sampler that showed the model the wrong timesteps would leave most of the noise in
    coarse = text_to_image(
        m, prompts, generator=gens(*range(32)), guidance_scale=3.0, scheduler=scheduler, num_steps=10
    )
    assert abs(coarse.std().item() - sigma) > abs(x.std().item() - sigma)  # more steps, closer


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_clip_sample_range_clamps_every_x0_estimate(model, scheduler):
    """Each step's x_0 estimate (recomputed here from the traced x_t, eps and t with the training schedule)
    is clamped to [-r, r]; the last step lands on that estimate (abar_prev = 1, no noise), so the image
    equals the clamped estimate of the last step. A range above every estimate changes nothing."""
    prompts = [[[BOS, 10, 11, BOI]], [[BOS, 12, BOI]]]
    opts = dict(scheduler=scheduler, num_steps=4, guidance_scale=2.0, max_new_tokens=0)
    free, free_trace = collect(model, prompts, generator=gens(0, 1), **opts)

    def estimates(trace):
        out = []
        for e in (e for e in trace if e["kind"] == "eps"):
            t = torch.full((e["x_t"].shape[0],), e["t"])
            out.append(model.schedule.predict_x0(e["x_t"].double(), e["eps"].double(), t))
        return out

    x0_free = estimates(free_trace)
    largest = max(float(x.abs().max()) for x in x0_free)
    r = 0.5 * float(x0_free[-1].abs().max())  # cuts the last estimate for sure
    clipped, clipped_trace = collect(model, prompts, clip_sample_range=r, generator=gens(0, 1), **opts)
    final = torch.stack([g.images[0] for g in clipped])
    last = [e for e in clipped_trace if e["kind"] == "eps"][-1]
    expected = estimates([last])[0].clamp(-r, r).float()
    torch.testing.assert_close(final, expected, atol=1e-5, rtol=1e-5)
    assert float(final.abs().max()) == pytest.approx(r) and float(final.abs().max()) <= r + 1e-6
    assert float(torch.stack([g.images[0] for g in free]).abs().max()) > r
    # the first step saw the same x_t and eps, so only the clamp tells the runs apart afterwards
    torch.testing.assert_close(clipped_trace[0]["eps"], free_trace[0]["eps"])
    assert clipped_trace[0]["kind"] == "eps"
    loose, _ = collect(model, prompts, clip_sample_range=2 * largest, generator=gens(0, 1), **opts)
    assert_same_generations(loose, free, atol=1e-6)


# ====================================================================== API, CLI, benchmark
def test_text_to_image_and_caption_with_a_tokenizer():
    from transfusion.data import ByteTokenizer

    tok = ByteTokenizer()
    m = tiny(vocab_size=272)
    imgs = text_to_image(m, ["a red circle", "two blue squares"], tokenizer=tok, generator=0, **FAST)
    assert imgs.shape == (2, 4, 4, 4) and torch.isfinite(imgs).all()
    caps = caption(m, imgs, tokenizer=tok, max_new_tokens=8)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    ids = caption(m, imgs, max_new_tokens=8)
    assert all(isinstance(t, int) and t != BOI for c in ids for t in c)
    with pytest.raises(ValueError, match="pass tokenizer="):
        text_to_image(m, ["a red circle"])


def _write_run(path, model, source: str, ae=None, family: str = "transfusion") -> None:
    from safetensors.torch import save_file

    from transfusion.data import ByteTokenizer

    (path / "checkpoints").mkdir(parents=True)
    data = {"image_size": [16, 16], "latents": {"source": source}}
    cfg = {
        "family": family,
        "model": model.cfg.to_dict(),
        "train": TrainConfig(family=family).to_dict(),
        "data": data,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "checkpoints" / "step_00000003.safetensors"),
    )
    latest = {"step": 3, "model": "step_00000003.safetensors", "state": "step_00000003.state.pt"}
    (path / "checkpoints" / "latest.json").write_text(json.dumps(latest))
    ByteTokenizer().save(path / "tokenizer.json")
    if ae is not None:
        from transfusion.autoencoders import save_autoencoder

        save_autoencoder(ae, path / "autoencoder")


@pytest.mark.parametrize("source", ["auto", "pool", "discrete"])
def test_cli_writes_a_grid_and_captions_an_image(tmp_path, capsys, monkeypatch, source):
    """``transfusion generate`` on Transfusion runs (VAE or pool latents) and a discrete run (VQ codes)."""
    from PIL import Image

    from transfusion.autoencoders import AutoencoderConfig, TrainedAutoencoder, build_autoencoder
    from transfusion.baseline import DiscreteLM

    if source == "discrete":
        torch.manual_seed(0)
        cfg = get_preset(
            "tiny",
            vocab_size=272,
            dim=32,
            n_layers=2,
            n_heads=2,
            latent_size=4,
            max_seq_len=48,
            codebook_size=32,
        )
        m = DiscreteLM(cfg).eval()
    else:
        m = tiny(vocab_size=272)
    ae = None
    if source != "pool":
        kind = "vq" if source == "discrete" else "vae"
        ae_cfg = AutoencoderConfig(
            kind=kind,
            image_size=16,
            downsample=4,
            latent_channels=4,
            block_out_channels=(8, 8, 8),
            codebook_size=32,
        )
        ae = TrainedAutoencoder(build_autoencoder(ae_cfg, seed=0), ae_cfg)
    run = tmp_path / "run"
    _write_run(run, m, source, ae, family="discrete" if source == "discrete" else "transfusion")
    out = tmp_path / "grid.png"
    argv = ["--checkpoint", str(run), "--prompt", "a small red circle", "--n", "3", "--out", str(out)]
    assert generate_main([*argv, "--scheduler", "ddim", "--steps", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and ("VQ codes" in printed) == (source == "discrete")
    with Image.open(out) as im:
        assert im.size == (2 * 18 + 2, 2 * 18 + 2)  # 3 images of 16 px in a 2 x 2 grid, 2 px gaps
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
    assert (
        generate_main(
            ["--checkpoint", str(run), "--image", str(tmp_path / "red.png"), "--max-new-tokens", "5"]
        )
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")
    # Errors: exit status 2 with a message naming the problem.
    assert generate_main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "missing config.json" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(run), "--image", str(tmp_path / "none.png")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert generate_main([*argv, "--steps", "2", "--clip-sample-range", "10", "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert generate_main([*argv, "--clip-sample-range", "-1"]) == 2
    assert "clip_sample_range = -1.0 must be None or a finite number > 0" in capsys.readouterr().err
    # captions get the evaluations' one-token floor unless asked otherwise; a bad floor is refused
    import transfusion.generation.api as api

    floors = []
    real_caption = api.caption
    monkeypatch.setattr(api, "caption", lambda *a, **kw: floors.append(kw["config"].min_new_tokens) or ["x"])
    red = ["--checkpoint", str(run), "--image", str(tmp_path / "red.png"), "--max-new-tokens", "5"]
    assert generate_main(red) == 0 and generate_main([*red, "--min-new-tokens", "0"]) == 0
    assert generate_main([*red, "--max-new-tokens", "0"]) == 0  # the default floor yields to a 0 limit
    assert floors == [1, 0, 0]
    monkeypatch.setattr(api, "caption", real_caption)
    assert generate_main([*red, "--min-new-tokens", "6"]) == 2
    assert "min_new_tokens = 6" in capsys.readouterr().err
    assert generate_main([*red, "--min-new-tokens", "-1"]) == 2
    assert "--min-new-tokens -1: must be 0 or more" in capsys.readouterr().err


def test_generation_benchmark_writes_csv_and_provenance(tmp_path):
    from bench.generation import run_generation_bench

    rows = run_generation_bench(
        tmp_path,
        "cpu",
        prefix_lengths=(4, 12),
        model_overrides=dict(dim=32, n_layers=1, n_heads=2, latent_size=4, vocab_size=64),
        batch_size=2,
        num_steps=2,
        repeats=1,
        warmup=0,
    )
    assert [r["prefix_tokens"] for r in rows] == [4, 12]
    for r in rows:
        assert r["speedup"] > 0 and r["max_latent_diff"] < 1e-4
    lines = (tmp_path / "generation.csv").read_text().splitlines()
    assert lines[0].startswith("prefix_tokens,image_tokens") and len(lines) == 3
    prov = json.loads((tmp_path / "generation_provenance.json").read_text())
    assert prov["benchmark"] == "generation" and "torch" in prov
