"""Timestep weighting of the diffusion loss (``ModelConfig.diffusion_loss_weighting``) against float64
references written here from the definitions: min-SNR weighting (Hang et al. 2023) as an x_0-space weight
min(SNR, gamma), and the eps-equivalent v loss, which must equal the eps-MSE of the eps that the predicted
v implies."""

from __future__ import annotations

import pytest
import torch

from tests.test_transfusion_model import make_batch, small_cfg
from transfusion.config import ModelConfig
from transfusion.diffusion import NoiseSchedule, diffusion_loss, loss_weights
from transfusion.transfusion_model import Transfusion

pytestmark = pytest.mark.usefixtures("one_thread")


def _forward(prediction_type: str, weighting: str, gamma: float = 5.0):
    batch, noise, t = make_batch(seed=7)
    torch.manual_seed(1)
    cfg = small_cfg(prediction_type=prediction_type, diffusion_loss_weighting=weighting, min_snr_gamma=gamma)
    model = Transfusion(cfg)
    out = model(batch, noise=noise, timesteps=t)
    abar = model.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    return out, batch.latents.double(), noise.double(), abar, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "weighting,gamma", [("none", 5.0), ("min_snr", 5.0), ("min_snr", 0.5), ("eps_equivalent", 5.0)]
)
def test_weighted_loss_matches_the_definition(prediction_type, weighting, gamma):
    out, x0, eps, abar, _ = _forward(prediction_type, weighting, gamma)
    pred = out.eps_pred.detach().double()
    snr = abar / (1 - abar)
    if prediction_type == "epsilon":
        target, per_x0 = eps, snr  # eps-MSE = SNR * x0-MSE
    else:
        target, per_x0 = abar.sqrt() * eps - (1 - abar).sqrt() * x0, snr + 1  # v-MSE = (SNR + 1) * x0-MSE
    w_x0 = {"none": per_x0, "min_snr": snr.clamp(max=gamma), "eps_equivalent": snr}[weighting]
    per_image = (pred - target).pow(2).flatten(1).mean(1) * (w_x0 / per_x0).flatten()
    assert float(out.diffusion_loss.detach()) == pytest.approx(float(per_image.mean()), rel=1e-5)


def test_eps_equivalent_v_loss_is_the_eps_loss_of_the_implied_eps():
    out, x0, eps, abar, _ = _forward("v_prediction", "eps_equivalent")
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_implied = abar.sqrt() * out.eps_pred.detach().double() + (1 - abar).sqrt() * x_t
    expected = (eps_implied - eps).pow(2).flatten(1).mean(1).mean()
    assert float(out.diffusion_loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    # and the unweighted v loss is larger: it divides that error by abar
    plain, *_ = _forward("v_prediction", "none")
    assert float(plain.diffusion_loss) > float(out.diffusion_loss)


def test_min_snr_weights_only_cap_the_low_noise_steps():
    sched = NoiseSchedule()
    t = torch.arange(0, 1000, 37)
    w = loss_weights(sched, t, "epsilon", "min_snr", gamma=5.0)
    snr = sched.snr(t).double()
    assert torch.equal(w == 1.0, snr <= 5.0)  # high noise (SNR <= gamma): unchanged
    assert (w[snr > 5.0] < 1.0).all() and (w > 0).all()
    assert loss_weights(sched, t, "v_prediction", "none", 5.0) is None


def test_bad_weighting_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="ModelConfig.diffusion_loss_weighting = 'snr'"):
        ModelConfig(diffusion_loss_weighting="snr")
    for gamma in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="ModelConfig.min_snr_gamma"):
            ModelConfig(min_snr_gamma=gamma)
    with pytest.raises(ValueError, match="weights shape"):
        diffusion_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="weighting = 'snr'"):
        loss_weights(NoiseSchedule(), torch.tensor([1]), "epsilon", "snr")
