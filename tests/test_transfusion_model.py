"""Adapters and the Transfusion model: shapes, overfitting, gradients, the attention ablation, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from transfusion.adapters import LinearAdapter, UNetAdapter, patchify, unpatchify
from transfusion.config import ModelConfig
from transfusion.packing import SpecialTokens, pack_documents
from transfusion.transfusion_model import Transfusion

SP = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4, image=5)
V = 64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread (tests/conftest.py)


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=V,
        dim=64,
        n_layers=2,
        n_heads=4,
        ffn_multiple_of=16,
        max_seq_len=64,
        latent_channels=4,
        latent_size=8,
        patch_size=2,
        timestep_freq_dim=32,
        unet_channels=(8, 16),
        unet_groups=4,
    )
    return ModelConfig(**{**base, **kw})


def make_batch(seed: int = 0, patch_size: int = 2):
    """Row 0: caption-first pair + a text doc; row 1: image-first pair. 16 patches per image at k=2."""
    g = torch.Generator().manual_seed(seed)
    lat = lambda: torch.randn(4, 8, 8, generator=g)
    txt = lambda n: torch.randint(6, V, (n,), generator=g).tolist()
    # Distinct first tokens, so no two documents ask for different targets from the same context.
    docs = [
        [[6, *txt(6)], lat(), [2]],
        [[SP.bos], lat(), [*txt(5), 2]],
        [[8, *txt(8), 2]],
    ]
    batch = pack_documents(docs, seq_len=40, patch_size=patch_size, special=SP, vocab_size=V)
    noise = torch.randn(batch.latents.shape, generator=g)
    return batch, noise, torch.tensor([700, 300])


# ---------------------------------------------------------------- adapters
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patchify_exact_inverse_and_raster_order(k):
    x = torch.randn(2, 3, 16, 8)
    p = patchify(x, k)
    assert p.shape == (2, (16 // k) * (8 // k), 3 * k * k)
    assert torch.equal(unpatchify(p, k, 16, 8), x)
    assert torch.equal(p[:, 0], x[:, :, :k, :k].reshape(2, -1))  # top-left patch first
    if 8 // k > 1:
        assert torch.equal(p[:, 1], x[:, :, :k, k : 2 * k].reshape(2, -1))  # then along the row
    assert torch.equal(p[:, 8 // k], x[:, :, k : 2 * k, :k].reshape(2, -1))  # then the next row


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="patch_size = 4"):
        patchify(torch.zeros(1, 4, 6, 8), 4)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_linear_adapter_shapes(k):
    a = LinearAdapter(small_cfg(patch_size=k))
    x = torch.randn(3, 4, 8, 8)
    tokens, ctx = a.encode(x, torch.tensor([0, 10, 999]))
    assert tokens.shape == (3, (8 // k) ** 2, 64)
    assert a.decode(tokens, ctx).shape == (3, 4, 8, 8)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_unet_adapter_shapes(k):
    a = UNetAdapter(small_cfg(adapter="unet", patch_size=k))
    x = torch.randn(3, 4, 8, 8)
    tokens, ctx = a.encode(x, torch.tensor([0, 10, 999]))
    assert tokens.shape == (3, (8 // k) ** 2, 64)
    assert a.decode(tokens, ctx).shape == (3, 4, 8, 8)
    # The timestep conditions the output: same image, different t, different encoding.
    t2, _ = a.encode(x, torch.tensor([5, 500, 50]))
    assert (t2 - tokens).abs().max() > 1e-4


# ---------------------------------------------------------------- model
def test_loss_parts_and_noise_limit():
    torch.manual_seed(0)
    model = Transfusion(small_cfg())
    batch, noise, t = make_batch()
    assert batch.image_first.tolist() == [False, True]
    out = model(batch, noise=noise, timesteps=t)
    assert out.n_images == 2 and out.n_lm_tokens == int(batch.lm_mask.sum())
    assert out.eps_pred.shape == noise.shape
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 5.0 * out.diffusion_loss.item(), rel=1e-6)
    assert out.lm_loss.item() == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=0.1)
    # Sampled timesteps: the image-first image is noise-limited, the caption-first one is not.
    g = torch.Generator().manual_seed(0)
    ts = torch.stack([model.sample_timesteps(batch, g) for _ in range(300)])
    assert int(ts[:, 1].max()) <= 500 and int(ts[:, 0].max()) > 900
    off = Transfusion(small_cfg(noise_limit_t=None))
    assert int(torch.stack([off.sample_timesteps(batch, g) for _ in range(300)])[:, 1].max()) > 900
    assert model(batch, generator=g).timesteps[1].item() <= 500


def test_text_only_batch():
    model = Transfusion(small_cfg())
    batch = pack_documents([[[1, 9, 10, 11, 2]]], seq_len=8, patch_size=2, special=SP)
    out = model(batch)
    assert out.diffusion_loss.item() == 0.0 and out.eps_pred is None
    assert out.loss.item() == pytest.approx(out.lm_loss.item())
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_overfits_one_batch():
    """Both losses fall by >= 90% within 300 Adam steps on one fixed batch, noise and timesteps."""
    torch.manual_seed(0)
    model = Transfusion(small_cfg())
    batch, noise, t = make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        out = model(batch, noise=noise, timesteps=t)
        if first is None:
            first = (out.lm_loss.item(), out.diffusion_loss.item())
        if out.lm_loss.item() < 0.1 * first[0] and out.diffusion_loss.item() < 0.1 * first[1]:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.lm_loss.item() < 0.1 * first[0], (first, out.as_dict())
    assert out.diffusion_loss.item() < 0.1 * first[1], (first, out.as_dict())


@pytest.mark.parametrize("adapter", ["linear", "unet"])
def test_gradients_reach_both_adapter_sides(adapter):
    torch.manual_seed(0)
    model = Transfusion(small_cfg(adapter=adapter))
    batch, noise, t = make_batch()
    model(batch, noise=noise, timesteps=t).loss.backward()
    for side in ("in_parameters", "out_parameters"):
        params = getattr(model.adapter, side)()
        assert params
        dead = [tuple(p.shape) for p in params if p.grad is None or p.grad.abs().sum() == 0]
        assert not dead, (side, dead)
    assert model.tok_emb.weight.grad.abs().sum() > 0
    assert model.transformer.layers[0].attn.wq.weight.grad.abs().sum() > 0


def test_causal_only_ablation():
    """Text before an image sees the same keys in both layouts; image patches do not."""
    torch.manual_seed(0)
    full = Transfusion(small_cfg())
    causal = Transfusion(small_cfg(causal_only_images=True))
    causal.load_state_dict(full.state_dict())
    batch, noise, t = make_batch()
    h_full = full(batch, noise=noise, timesteps=t, return_hidden=True).hidden
    h_causal = causal(batch, noise=noise, timesteps=t, return_hidden=True).hidden
    (r, s, e), (r1, s1, e1) = batch.image_spans
    # Everything up to and including <BOI> of row 0's image: identical (rounding of different masks only).
    torch.testing.assert_close(h_full[r, :s], h_causal[r, :s], rtol=0, atol=1e-6)
    torch.testing.assert_close(h_full[r1, :s1], h_causal[r1, :s1], rtol=0, atol=1e-6)
    # Patches differ: clearly where a patch lost its view of later patches; the last patch sees the
    # whole image in both, and differs only through layer 1's changed outputs of the other patches.
    for row, start, end in batch.image_spans:
        diff = (h_full[row, start:end] - h_causal[row, start:end]).abs().amax(-1)
        assert bool((diff[:-1] > 1e-3).all()) and diff[-1] > 1e-6, diff


def test_naive_backend_equals_sdpa():
    torch.manual_seed(0)
    a = Transfusion(small_cfg(attention="naive", adapter="unet"))
    b = Transfusion(small_cfg(attention="sdpa", adapter="unet"))
    b.load_state_dict(a.state_dict())
    batch, noise, t = make_batch()
    out_a = a(batch, noise=noise, timesteps=t, return_hidden=True)
    out_b = b(batch, noise=noise, timesteps=t, return_hidden=True)
    # float32 everywhere; the two kernels differ only in summation order.
    torch.testing.assert_close(out_a.hidden, out_b.hidden, rtol=1e-5, atol=1e-5)
    assert out_a.loss.item() == pytest.approx(out_b.loss.item(), rel=1e-5)


def _bad(batch, **changes):
    return dataclasses.replace(batch, **changes)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b, n, t: (_bad(b, tokens=b.tokens.clone().fill_(V)), n, t), f"tokens: id {V} is outside"),
        (lambda b, n, t: (_bad(b, tokens=b.tokens - 1), n, t), "tokens: id -1"),
        (
            lambda b, n, t: (_bad(b, latents=torch.randn(2, 4, 9, 9)), None, t),
            r"latents: \(H, W\) = \(9, 9\)",
        ),
        (
            lambda b, n, t: (_bad(b, latents=b.latents.clone().fill_(float("nan"))), n, t),
            "latents contain NaN",
        ),
        (lambda b, n, t: (_bad(b, latents=b.latents * float("inf")), n, t), "latents contain NaN or Inf"),
        (lambda b, n, t: (_bad(b, latents=b.latents[:, :3]), None, t), "latent_channels = 4"),
        (lambda b, n, t: (b, n[:, :, :4], t), "noise: shape"),
        (lambda b, n, t: (b, n, torch.tensor([0, 1000])), "timesteps: 1000"),
        (lambda b, n, t: (b, n, torch.tensor([1.0, 2.0])), "timesteps: need"),
        (lambda b, n, t: (_bad(b, patch_size=4), n, t), "batch.patch_size = 4"),
    ],
)
def test_bad_inputs_raise_before_compute(mutate, match, monkeypatch):
    model = Transfusion(small_cfg())

    def no_compute(*args, **kwargs):
        raise AssertionError("model compute ran before input validation")

    monkeypatch.setattr(model.tok_emb, "forward", no_compute)
    monkeypatch.setattr(model.adapter, "encode", no_compute)
    batch, noise, t = mutate(*make_batch())
    with pytest.raises(ValueError, match=match):
        model(batch, noise=noise, timesteps=t)


def test_too_long_sequence_for_config():
    model = Transfusion(small_cfg(max_seq_len=32))
    batch, noise, t = make_batch()  # rows of 40
    with pytest.raises(ValueError, match="max_seq_len = 32"):
        model(batch, noise=noise, timesteps=t)
