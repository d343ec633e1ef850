"""Noise schedule parity with diffusers, noising, timestep sampling with noise limiting, the loss."""

from __future__ import annotations

import pytest
import torch

from transfusion.diffusion import (
    NoiseSchedule,
    cosine_betas,
    diffusion_loss,
    epsilon_target,
    sample_timesteps,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ddpm():
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def test_schedule_matches_diffusers(ddpm):
    ours = NoiseSchedule(1000)
    assert ours.alphas_cumprod.shape == (1000,)
    assert (ours.alphas_cumprod - ddpm.alphas_cumprod).abs().max().item() < 1e-6
    assert (ours.betas - ddpm.betas).abs().max().item() < 1e-6
    # Sanity of the cosine shape itself: near 1 at t=0, near 0 at t=T-1, strictly decreasing.
    assert ours.alphas_cumprod[0].item() > 0.9999
    assert ours.alphas_cumprod[-1].item() < 1e-4
    assert bool((ours.alphas_cumprod[1:] < ours.alphas_cumprod[:-1]).all())
    assert cosine_betas(1000).max().item() == pytest.approx(0.999)


def test_add_noise_matches_diffusers(ddpm):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = NoiseSchedule().add_noise(x0, noise, t)
    theirs = ddpm.add_noise(x0, noise, t)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_predict_x0_inverts_add_noise():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 400, 900])
    x_t = s.add_noise(x0, noise, t)
    torch.testing.assert_close(s.predict_x0(x_t, noise, t), x0, rtol=0, atol=1e-3)
    assert epsilon_target(x0, noise, t) is noise


def test_add_noise_rejects_bad_timesteps():
    s = NoiseSchedule()
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="timesteps"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="timesteps"):
        s.add_noise(x, x, torch.tensor([0]))


def test_sample_timesteps_noise_limit():
    g = torch.Generator().manual_seed(0)
    first = torch.tensor([True, False] * 2000)
    t = sample_timesteps(4000, first, num_timesteps=1000, noise_limit_t=500, generator=g)
    assert t.dtype == torch.int64
    assert int(t[first].max()) <= 500 and int(t[first].min()) >= 0
    assert int(t[first].max()) >= 490  # the limit itself is reachable (inclusive bound)
    assert int(t[~first].max()) > 900 and int(t[~first].min()) < 100
    # Disabled: image-first images sample the full range too.
    t_off = sample_timesteps(4000, first, noise_limit_t=None, generator=g)
    assert int(t_off[first].max()) > 900
    with pytest.raises(ValueError, match="image_first"):
        sample_timesteps(3, torch.tensor([True]), generator=g)


def test_diffusion_loss_per_image_then_mean():
    eps = torch.zeros(2, 1, 2, 2)
    pred = torch.zeros(2, 1, 2, 2)
    pred[0] = 1.0  # image 0: MSE 1
    pred[1, 0, 0, :] = 2.0  # image 1: MSE (4 + 4) / 4 = 2
    assert diffusion_loss(pred, eps).item() == pytest.approx((1.0 + 2.0) / 2)
    empty = torch.zeros(0, 1, 2, 2, requires_grad=True)
    z = diffusion_loss(empty, empty.detach())
    assert z.item() == 0.0 and z.requires_grad
    with pytest.raises(ValueError, match="eps_pred shape"):
        diffusion_loss(pred, eps[:1])
