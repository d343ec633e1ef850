"""DDPM training pieces: the cosine noise schedule, noising, epsilon targets, timestep sampling, loss.

The schedule is the "squaredcos_cap_v2" (improved-DDPM / GLIDE) cosine schedule with T = 1000 training
steps; its betas and cumulative alphas equal diffusers' ``DDPMScheduler(beta_schedule="squaredcos_cap_v2")``
(tested), so diffusers schedulers can sample from a model trained with it.

    alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2),   s = t / T
    beta_t      = min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), 0.999)
    x_t         = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,   abar_t = prod_{s <= t} (1 - beta_s)

The model predicts eps (the paper) or, with ``prediction_type="v_prediction"``, the velocity
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022; diffusers' ``get_velocity``). The loss is
the MSE between prediction and target, averaged over each image's elements, then over images (paper:
"diffusion loss per image"), optionally weighted per image by its timestep (:func:`loss_weights`).

Weights. With SNR_t = abar_t / (1 - abar_t), an error in the x_0 estimate costs SNR_t times as much in
eps-MSE and SNR_t + 1 times as much in v-MSE. So the unweighted v loss is the eps loss divided by abar_t:
it weights the noisiest timesteps far more. A weighting is chosen as a weight W_t on x_0-MSE and turned
into the per-image factor W_t / SNR_t (eps) or W_t / (SNR_t + 1) (v):

    "none"            factor 1 (the paper, for eps: W_t = SNR_t)
    "min_snr"         W_t = min(SNR_t, gamma) (Hang et al. 2023, "Min-SNR weighting", gamma = 5)
    "eps_equivalent"  W_t = SNR_t: factor 1 for eps, abar_t for v (the v loss then equals the eps loss)
"""

from __future__ import annotations

import math

import torch


def cosine_alpha_bar(s: float) -> float:
    """Continuous-time cumulative signal level at s in [0, 1]."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """(T,) float32 betas of the capped cosine schedule (computed in float64, then rounded like diffusers)."""
    T = num_timesteps
    betas = [min(1 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


class NoiseSchedule:
    """The discrete cosine schedule: betas, alphas, alphas_cumprod (all float32, shape (T,))."""

    def __init__(self, num_timesteps: int = 1000) -> None:
        if num_timesteps <= 0:
            raise ValueError(f"num_timesteps = {num_timesteps} must be positive")
        self.num_timesteps = num_timesteps
        self.betas = cosine_betas(num_timesteps)
        self.alphas = 1.0 - self.betas
        # float32 cumulative product, as diffusers does, so the two agree bit for bit.
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast to ``like``'s rank: (N,) -> (N, 1, 1, ...)."""
        t = torch.as_tensor(t, device=like.device)
        if t.dim() != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"timesteps must be (N,) with N = {like.shape[0]}; got shape {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps}); got range [{int(t.min())}, {int(t.max())}]"
            )
        abar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.long()]
        return abar.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0 and noise (N, ...), t (N,) integer."""
        if x0.shape != noise.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Invert add_noise given a (predicted) eps."""
        abar = self._abar(t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, the v-prediction target."""
        if x0.shape != noise.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[torch.as_tensor(t).long()]
        return abar / (1 - abar)


def epsilon_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target of epsilon prediction: the noise itself (x0 and t kept for a uniform API)."""
    del x0, t
    return noise


def diffusion_target(
    prediction_type: str, schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The regression target of ``prediction_type``: "epsilon" (the noise) or "v_prediction" (v)."""
    if prediction_type == "epsilon":
        return epsilon_target(x0, noise, t)
    if prediction_type == "v_prediction":
        return schedule.velocity(x0, noise, t)
    raise ValueError(f"prediction_type = {prediction_type!r} must be 'epsilon' or 'v_prediction'")


def loss_weights(
    schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str, weighting: str, gamma: float = 5.0
) -> torch.Tensor | None:
    """(N,) float32 per-image factors of the diffusion MSE (see the module doc), or None for "none"."""
    if weighting == "none":
        return None
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type = {prediction_type!r} must be 'epsilon' or 'v_prediction'")
    abar = schedule.alphas_cumprod.to(t.device).double()[t.long()]
    snr = abar / (1 - abar)
    if weighting == "min_snr":
        w_x0 = snr.clamp(max=gamma)
    elif weighting == "eps_equivalent":
        w_x0 = snr
    else:
        raise ValueError(f"weighting = {weighting!r} must be 'none', 'min_snr' or 'eps_equivalent'")
    return (w_x0 / (snr if prediction_type == "epsilon" else snr + 1)).float()


def sample_timesteps(
    n: int,
    image_first: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    noise_limit_t: int | None = 500,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n,) int64 timesteps, uniform on [0, T); image-first images uniform on [0, noise_limit_t].

    Noise limiting (paper section 4.1): when an image precedes its caption, the caption is conditioned
    on the image, so the image is kept fairly clean (t <= 500) during training. ``noise_limit_t=None``
    turns it off.
    """
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    if noise_limit_t is not None and image_first is not None and n:
        image_first = torch.as_tensor(image_first, dtype=torch.bool, device=device)
        if image_first.shape != (n,):
            raise ValueError(f"image_first must have shape ({n},); got {tuple(image_first.shape)}")
        limited = torch.randint(0, noise_limit_t + 1, (n,), generator=generator, device=device)
        t = torch.where(image_first, limited, t)
    return t


def diffusion_loss(
    eps_pred: torch.Tensor, eps: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE per image (mean over its C, H, W), times the image's weight if given (:func:`loss_weights`),
    then mean over images; 0 when there are no images."""
    if eps_pred.shape != eps.shape:
        raise ValueError(
            f"eps_pred shape {tuple(eps_pred.shape)} does not match eps shape {tuple(eps.shape)}"
        )
    if weights is not None and tuple(weights.shape) != (eps.shape[0],):
        raise ValueError(f"weights shape {tuple(weights.shape)} must be (N,) = ({eps.shape[0]},)")
    if eps.shape[0] == 0:
        return eps_pred.sum() * 0.0  # keeps the graph (and dtype/device) without dividing by zero
    per_image = (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_image = per_image * weights.to(per_image)
    return per_image.mean()


__all__ = [
    "NoiseSchedule",
    "cosine_alpha_bar",
    "cosine_betas",
    "diffusion_loss",
    "diffusion_target",
    "epsilon_target",
    "loss_weights",
    "sample_timesteps",
]
