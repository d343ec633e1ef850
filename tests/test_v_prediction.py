"""v-prediction (``ModelConfig.prediction_type``): the target against diffusers, the loss against a float64
reference, and the sampler against the closed-form v of Gaussian data."""

from __future__ import annotations

import pytest
import torch

from tests.test_generate import gaussian_oracle, gens, tiny
from tests.test_transfusion_model import make_batch, small_cfg
from transfusion.config import ModelConfig
from transfusion.diffusion import NoiseSchedule, diffusion_target
from transfusion.generation import text_to_image
from transfusion.transfusion_model import Transfusion

pytestmark = pytest.mark.usefixtures("one_thread")


def test_velocity_equals_diffusers_get_velocity():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = NoiseSchedule().velocity(x0, noise, t)
    torch.testing.assert_close(ours, ref.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)
    assert diffusion_target("epsilon", NoiseSchedule(), x0, noise, t) is noise
    with pytest.raises(ValueError, match="prediction_type = 'x0'"):
        diffusion_target("x0", NoiseSchedule(), x0, noise, t)


def test_v_prediction_loss_is_the_mse_to_v():
    batch, noise, t = make_batch(seed=4)
    torch.manual_seed(0)
    model = Transfusion(small_cfg(prediction_type="v_prediction"))
    out = model(batch, noise=noise, timesteps=t)
    abar = model.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x0, eps, pred = batch.latents.double(), noise.double(), out.eps_pred.detach().double()
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    expected = (pred - v).pow(2).flatten(1).mean(1).mean()
    assert float(out.diffusion_loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    # the epsilon model's loss on the same prediction would differ: the target really changed
    assert abs(float((pred - eps).pow(2).flatten(1).mean(1).mean()) - float(expected)) > 1e-3


def test_bad_prediction_type_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="ModelConfig.prediction_type = 'x0' must be one of"):
        ModelConfig(prediction_type="x0")


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_sampling_with_the_exact_v_of_gaussian_data_recovers_it(scheduler):
    """As the exact-eps oracle in test_generate, for a v-prediction model (``gaussian_oracle`` returns the
    exact v). A sampler that read v as eps fails."""
    mu, sigma = 0.7, 0.5
    m = gaussian_oracle(tiny(seed=5, prediction_type="v_prediction"), mu, sigma)
    x = text_to_image(
        m, [[10, 11, 12]] * 32, generator=gens(*range(32)), guidance_scale=3.0, scheduler=scheduler,
        num_steps=250,
    )  # fmt: skip
    assert abs(x.mean().item() - mu) < 0.04 and abs(x.std().item() - sigma) < 0.03
