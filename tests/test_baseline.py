"""The discrete (Chameleon-style) baseline: vocabulary, packing, the data mix, the model, sampling, FLOPs."""

from __future__ import annotations

import pytest
import torch

from transfusion.baseline import (
    DiscreteLM,
    DiscreteStream,
    DiscreteVocab,
    discrete_analytic_step_flops,
    discrete_target_counts,
    pack_discrete_documents,
)
from transfusion.baseline_sampling import caption_images, generate_images, recompute_logits, sample_token
from transfusion.config import ModelConfig
from transfusion.flops import measure_step_flops
from transfusion.layout import IMAGE
from transfusion.packing import SpecialTokens, pack_documents
from transfusion.training_data import MixedModalStream, StreamConfig

SP = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4, image=5)
TEXT_V, K, GRID = 40, 24, 4  # text vocabulary, codebook entries, 4 x 4 codes per image
VOCAB = DiscreteVocab(TEXT_V, K)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread (tests/conftest.py)


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=TEXT_V, dim=64, n_layers=2, n_heads=4, ffn_multiple_of=16, max_seq_len=64)
    return ModelConfig(**{**base, "latent_size": GRID, **kw})


def make_model(seed: int = 0, **kw) -> DiscreteLM:
    torch.manual_seed(seed)
    return DiscreteLM(small_cfg(**kw), codebook_size=K).eval()


def codes(g: torch.Generator, n: int | None = None) -> torch.Tensor:
    shape = (GRID, GRID) if n is None else (n, GRID, GRID)
    return torch.randint(0, K, shape, generator=g)


def make_docs(seed: int = 0):
    """Row 0: a caption-first pair and a text document; row 1: an image-first pair (distinct openings)."""
    g = torch.Generator().manual_seed(seed)
    txt = lambda n: torch.randint(6, TEXT_V, (n,), generator=g).tolist()
    return [
        [[6, *txt(6)], codes(g), [SP.eos]],
        [[8, *txt(8), SP.eos]],
        [[SP.bos], codes(g), [*txt(5), SP.eos]],
    ]


# ====================================================================== vocabulary and packing
def test_vocab_maps_codes_after_the_text_ids():
    c = torch.tensor([[0, 5], [K - 1, 2]])
    t = VOCAB.codes_to_tokens(c)
    assert t.tolist() == [[TEXT_V, TEXT_V + 5], [TEXT_V + K - 1, TEXT_V + 2]]
    assert torch.equal(VOCAB.tokens_to_codes(t), c)
    assert VOCAB.size == TEXT_V + K
    assert VOCAB.is_code(torch.tensor([TEXT_V - 1, TEXT_V, TEXT_V + K - 1, TEXT_V + K])).tolist() == [
        False,
        True,
        True,
        False,
    ]
    assert VOCAB.image_tokens(c, SP) == [SP.boi, *t.reshape(-1).tolist(), SP.eoi]


def test_packing_lays_out_images_as_code_tokens_with_causal_attention():
    docs = make_docs()
    batch = pack_discrete_documents(docs, seq_len=40, vocab=VOCAB, special=SP)
    n = GRID * GRID
    assert batch.num_images == 0 and batch.layout.image_spans == ((), ())
    assert not bool((batch.layout.modality == IMAGE).any())
    # caption-first document: caption <BOI> codes (raster order) <EOI> <EOS>
    cap = docs[0][0]
    row0 = batch.tokens[0].tolist()
    expect = [*cap, SP.boi, *VOCAB.codes_to_tokens(docs[0][1]).reshape(-1).tolist(), SP.eoi, SP.eos]
    assert row0[: len(expect)] == expect
    # every real token attends causally within its document
    valid = batch.layout.valid[0]
    q = torch.arange(batch.seq_len, dtype=torch.int32)
    assert torch.equal(batch.layout.hi[0][valid], q[valid])
    # targets: BOI and every code are predicted, EOI is not, the token after EOI is
    boi = len(cap)
    eoi = boi + n + 1
    t = batch.lm_targets[0]
    assert t[boi - 1] == SP.boi
    assert t[boi : boi + n].tolist() == expect[boi + 1 : boi + 1 + n]
    assert t[eoi - 1] == -100 and not batch.lm_mask[0, eoi - 1]
    assert t[eoi] == SP.eos
    n_text, n_image = discrete_target_counts(batch, VOCAB)
    assert n_image == 2 * n  # two images, every code is a target
    assert n_text + n_image == int(batch.lm_mask.sum())


def test_caption_dropout_matches_transfusion_packing_draw_for_draw():
    g = torch.Generator().manual_seed(1)
    caps = [torch.randint(6, TEXT_V, (5,), generator=g).tolist() for _ in range(12)]
    grids = codes(g, 12)
    lat = torch.randn(12, 4, GRID, GRID, generator=g)
    disc = [[[SP.bos, *c], grids[i], [SP.eos]] for i, c in enumerate(caps)]
    cont = [[[SP.bos, *c], lat[i], [SP.eos]] for i, c in enumerate(caps)]
    d = pack_discrete_documents(
        disc, 64, VOCAB, SP, caption_dropout=0.5, generator=torch.Generator().manual_seed(3)
    )
    t = pack_documents(cont, 64, 1, SP, caption_dropout=0.5, generator=torch.Generator().manual_seed(3))
    dropped = t.caption_dropped.tolist()
    assert 0 < sum(dropped) < len(dropped)
    for i, (r, s, e) in enumerate(d.doc_spans):
        toks = d.tokens[r, s:e].tolist()
        assert (toks[1] == SP.boi) == dropped[t.image_docs.tolist().index(i)]


def test_stream_gives_transfusions_data_mix():
    """Same seed and document lengths: same example order, caption-first draws, dropout and batching."""
    g = torch.Generator().manual_seed(2)
    n = 24
    caps = [
        torch.randint(6, TEXT_V, (int(torch.randint(2, 6, (), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    grids = codes(g, n)
    sc = StreamConfig(seq_len=48, batch_rows=2, patch_size=1, caption_dropout=0.3, seed=7)
    ds = DiscreteStream(caps, grids, sc, VOCAB, SP)
    ts = MixedModalStream(caps, torch.randn(n, 2, GRID, GRID, generator=g), sc, SP, TEXT_V)
    flags, drops = [], []
    for _ in range(6):
        db, tb = next(ds), next(ts)
        assert db.doc_spans == tb.doc_spans
        # the text of every document agrees once images are taken out
        mask_d = ~VOCAB.is_code(db.tokens)
        mask_t = tb.layout.modality != IMAGE
        for r, s, e in db.doc_spans:
            assert db.tokens[r, s:e][mask_d[r, s:e]].tolist() == tb.tokens[r, s:e][mask_t[r, s:e]].tolist()
        flags += tb.image_first.tolist()
        drops += tb.caption_dropped.tolist()
    assert 0 < sum(flags) < len(flags) and any(drops)
    assert ds.state_dict() == ts.state_dict()


# ====================================================================== the model
def test_overfits_a_fixed_batch():
    model = make_model().train()
    batch = pack_discrete_documents(make_docs(), seq_len=40, vocab=VOCAB, special=SP)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(300):
        out = model(batch)
        if first is None:
            first = float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if float(out.loss.detach()) <= 0.1 * first:
            break
    assert float(out.loss.detach()) <= 0.1 * first, (first, float(out.loss.detach()))


def test_loss_parts_share_transfusions_columns():
    model = make_model()
    batch = pack_discrete_documents(make_docs(), seq_len=40, vocab=VOCAB, special=SP)
    out = model(batch)
    row = out.as_dict()
    assert {"loss", "lm_loss", "diffusion_loss", "text_loss", "image_loss"} <= set(row)
    assert row["diffusion_loss"] == 0.0 and out.lm_loss is out.loss
    n_text, n_image = discrete_target_counts(batch, VOCAB)
    assert (out.n_text_tokens, out.n_image_tokens) == (n_text, n_image)
    mix = (n_text * out.text_loss + n_image * out.image_loss) / (n_text + n_image)
    assert float(mix) == pytest.approx(float(out.loss.detach()), rel=1e-6)
    assert out.text_loss.grad_fn is None and out.image_loss.grad_fn is None


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_on_and_off(qk_norm):
    model = make_model(qk_norm=qk_norm).train()
    has = [m.attn.q_norm is not None for m in model.transformer.layers]
    assert all(has) if qk_norm else not any(has)
    batch = pack_discrete_documents(make_docs(), seq_len=40, vocab=VOCAB, special=SP)
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_flops_match_transfusions_accounting_with_the_full_vocabulary():
    model = make_model(attention="naive")
    batch = pack_discrete_documents(make_docs(), seq_len=40, vocab=VOCAB, special=SP)
    est = discrete_analytic_step_flops(model.cfg, batch, codebook_size=K)
    assert est.lm_head == 3 * 2 * model.cfg.dim * (TEXT_V + K) * int(batch.lm_mask.sum())
    assert est.adapter == 0 and est.images == 0
    measured = measure_step_flops(model, batch)
    assert measured == pytest.approx(est.total_dense_attention, rel=5e-3)
    p = model.num_params()
    assert p["total"] == sum(x.numel() for x in model.parameters())


# ====================================================================== sampling
@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_sampling_equals_recomputation(qk_norm):
    model = make_model(seed=3, qk_norm=qk_norm)
    g = torch.Generator().manual_seed(0)
    # captions of different lengths, and guidance: rows are left-padded by different amounts
    out = generate_images(
        model,
        [[7, 8, 9, 10], [11]],
        special=SP,
        cfg_scale=3.0,
        temperature=1.0,
        generator=g,
        return_logits=True,
    )
    ref = recompute_logits(model, out.tokens, out.pads)
    P = out.prompt_len
    for s in range(GRID * GRID):
        torch.testing.assert_close(out.step_logits[s], ref[:, P - 1 + s], rtol=0, atol=1e-5)
    cap = caption_images(
        model, out.codes, special=SP, max_new_tokens=6, temperature=1.0, generator=g, return_logits=True
    )
    ref = recompute_logits(model, cap.sequences, torch.zeros(2, dtype=torch.long))
    for s in range(cap.step_logits.shape[0]):
        torch.testing.assert_close(cap.step_logits[s], ref[:, cap.prompt_len - 1 + s], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_every_image_has_exactly_h_times_w_codes_in_the_codebook(cfg_scale):
    model = make_model(seed=1)
    for seed in range(3):
        for grid, top_k in (((GRID, GRID), None), ((2, 3), 5)):
            g = torch.Generator().manual_seed(seed)
            out = generate_images(
                model, [[7, 8], [], [9]], special=SP, cfg_scale=cfg_scale, temperature=1.5, top_k=top_k,
                generator=g, grid=grid,
            )  # fmt: skip
            h, w = grid
            assert out.codes.shape == (3, h, w) and out.codes.dtype == torch.long
            assert int(out.codes.min()) >= 0 and int(out.codes.max()) < K
            body = out.tokens[:, out.prompt_len :]
            assert body.shape[1] == h * w + 1
            assert bool(VOCAB.is_code(body[:, :-1]).all()) and bool((body[:, -1] == SP.eoi).all())
            assert out.tokens.shape[0] == (3 if cfg_scale == 1.0 else 6)


def test_sampling_is_seeded_and_guidance_uses_the_caption_dropped_prompt():
    model = make_model(seed=2)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate_images(model, [[7, 8, 9]], special=SP, cfg_scale=3.0, generator=g).codes

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # scale 0 keeps only the unconditional logits: the same as sampling from the empty caption
    a = generate_images(model, [[7, 8, 9], [10]], special=SP, cfg_scale=0.0, temperature=0.0).codes
    b = generate_images(model, [[]], special=SP, cfg_scale=1.0, temperature=0.0).codes
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[0])

    def cap(seed):
        g = torch.Generator().manual_seed(seed)
        return caption_images(
            model, a, special=SP, max_new_tokens=5, temperature=1.0, generator=g, text_vocab=TEXT_V - 10
        )

    assert cap(5).tokens == cap(5).tokens
    for toks in cap(6).tokens + cap(7).tokens:
        assert all(0 <= t < TEXT_V - 10 and t not in (SP.pad, SP.bos, SP.boi, SP.eoi, SP.eos) for t in toks)


def test_per_row_generators_make_a_batch_equal_each_row_alone():
    model = make_model(seed=4)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    caps = [[7, 8, 9], [10], [11, 12]]
    batch = generate_images(model, caps, special=SP, cfg_scale=2.0, generator=gens(0, 1, 2)).codes
    for i, c in enumerate(caps):
        alone = generate_images(model, [c], special=SP, cfg_scale=2.0, generator=gens(i)).codes
        assert torch.equal(alone[0], batch[i]), i
    texts = caption_images(
        model, batch, special=SP, max_new_tokens=4, temperature=1.0, generator=gens(3, 4, 5)
    )
    for i in range(3):
        one = caption_images(
            model, batch[i : i + 1], special=SP, max_new_tokens=4, temperature=1.0, generator=gens(3 + i)
        )
        assert one.tokens[0] == texts.tokens[i]
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        generate_images(model, caps, special=SP, generator=gens(0, 1))


def test_sample_token_modes():
    logits = torch.tensor([[0.0, 3.0, 1.0, float("-inf")], [5.0, 0.0, 0.0, 0.0]])
    assert sample_token(logits, temperature=0.0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_token(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) <= {1, 2} and set(draws[:, 1].tolist()) <= {0, 1, 2, 3}
    assert not bool((draws[:, 0] == 3).any())


# ====================================================================== bad inputs
def test_bad_inputs_raise_value_errors_naming_the_field():
    model = make_model()
    bad = torch.full((GRID, GRID), 3)
    bad[1, 2] = K
    with pytest.raises(ValueError, match=rf"documents\[0\]\[1\]: code {K} is outside the codebook"):
        pack_discrete_documents([[[SP.bos, 7], bad, [SP.eos]]], 40, VOCAB, SP)
    with pytest.raises(ValueError, match=r"documents\[0\]\[1\]: a float tensor"):
        pack_discrete_documents([[[SP.bos], torch.randn(GRID, GRID), [SP.eos]]], 40, VOCAB, SP)
    with pytest.raises(ValueError, match=rf"documents\[0\]\[0\]: token id {TEXT_V} is outside the text"):
        pack_discrete_documents([[[SP.bos, TEXT_V], bad.clamp_max(0)]], 40, VOCAB, SP)
    with pytest.raises(ValueError, match=r"codes: code -1 is outside the codebook"):
        caption_images(model, torch.full((1, GRID, GRID), -1), special=SP)
    with pytest.raises(ValueError, match=rf"codes: code {K} is outside"):
        DiscreteStream([[7]], bad[None], StreamConfig(seq_len=40, batch_rows=1, patch_size=1), VOCAB, SP)
    with pytest.raises(ValueError, match=r"captions\[1\] has 60 tokens.*max_seq_len = 64"):
        generate_images(model, [[7], [7] * 60], special=SP)
    with pytest.raises(ValueError, match=r"max_new_tokens = 50.*max_seq_len = 64"):
        caption_images(model, torch.zeros(1, GRID, GRID, dtype=torch.long), special=SP, max_new_tokens=50)
    with pytest.raises(ValueError, match=rf"captions\[0\]: token id {TEXT_V + 1} is outside"):
        generate_images(model, [[TEXT_V + 1]], special=SP)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate_images(model, [[7]], special=SP, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        generate_images(model, [[7]], special=SP, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate_images(model, [[7]], special=SP, top_k=0)
    with pytest.raises(ValueError, match=rf"text_vocab = {TEXT_V + 1}"):
        caption_images(model, torch.zeros(1, GRID, GRID, dtype=torch.long), special=SP, text_vocab=TEXT_V + 1)
    with pytest.raises(ValueError, match="codebook_size"):
        DiscreteLM(small_cfg())
    # the model itself: ids past the full vocabulary, and Transfusion-style batches with latents
    batch = pack_discrete_documents(make_docs(), seq_len=40, vocab=VOCAB, special=SP)
    batch.tokens[0, 3] = TEXT_V + K
    with pytest.raises(ValueError, match=rf"tokens: id {TEXT_V + K} is outside"):
        model(batch)
    cont = pack_documents([[[SP.bos, 7], torch.randn(4, GRID, GRID), [SP.eos]]], 40, 2, SP)
    with pytest.raises(ValueError, match="continuous images"):
        model(cont)
