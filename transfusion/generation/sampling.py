"""Sampling settings, token sampling, per-row random generators and the diffusers schedulers.

Randomness. Every row of a batch owns one ``torch.Generator`` (on the CPU, so a seed gives the same
draws on any device). All of a row's random draws come from its own generator, in the order that row
needs them: one draw per sampled text token (none when greedy), the initial noise of each image, and the
noise of every stochastic scheduler step (DDPM; DDIM with ``eta > 0``). A row therefore gets the same
result alone or in any batch when it gets the same generator (up to float round-off of the batched
matmuls). ``row_generators`` turns what the caller passes into one generator per row:

* a list of generators: used as given (one per row);
* one generator: per-row seeds are drawn from it (so its state alone fixes the result);
* an int seed: row ``i`` gets ``torch.Generator().manual_seed(seed + i)``;
* None: per-row seeds are drawn from the global torch RNG (``torch.manual_seed`` fixes them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from transfusion.value_checks import is_finite_real, is_int

SCHEDULERS = ("ddpm", "ddim")
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50}  # paper: 250 DDPM steps at inference
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SamplingConfig:
    """Everything that decides what ``generate`` produces (besides the model, prompts and seeds).

    Text (LM mode):
        max_new_tokens: text tokens to sample per row (``<BOI>`` and ``<EOS>`` count; image patches and the
            inserted ``<EOI>`` do not). 0: only complete an image that the prompt opens with ``<BOI>``.
        min_new_tokens: ``<EOS>`` is not drawn before this many text tokens (1: no empty caption; caption
            dropout in training makes an image-first prefix end at once with a real probability).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens (None: all).
        allow_images: whether the model may sample ``<BOI>`` (a prompt ending with ``<BOI>`` always gets
            its image).
        max_images: most images generated per row (further ``<BOI>`` are masked); None: no limit.
        stop_at_eos: finish a row when it samples ``<EOS>``.
    Images (diffusion mode):
        scheduler: "ddpm" or "ddim" (diffusers schedulers configured as the training schedule).
        num_steps: denoising steps; None: 250 for DDPM (the paper), 50 for DDIM.
        guidance_scale: classifier-free guidance scale s, eps = eps_u + s * (eps_c - eps_u); None: no
            guidance (the unconditional rows are not computed at all).
        timestep_spacing: diffusers' spacing of the inference timesteps. "leading" (diffusers' default)
            runs t = T - T/N, ..., 0. "trailing" starts at t = T - 1, where the capped cosine schedule
            has abar = 2.4e-9: the x_0 estimate there divides the eps error by 5e-5, which blows up
            an imperfect (or untrained) model's samples.
        eta: DDIM's stochasticity (0: deterministic DDIM).
        clip_sample_range: clamp each step's x_0 estimate to [-r, r] (diffusers' ``clip_sample``); None:
            no clamp (the paper's recipe). The estimate (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
            multiplies the eps error by 1 / sqrt(abar_t), over 100 at the first DDPM steps: a small
            model's estimates there reach tens of times the data's scale, the step carries part of that
            into x_t, off the distribution the model was trained on, and the model does not pull it
            back, so its latents grow with the number of steps taken near t = T. A loose range (well
            above the data latents' largest values, e.g. 10 for unit-variance latents) leaves sound
            estimates untouched.
    Execution:
        use_cache: reuse the KV cache of the prefix (True) or recompute every row from scratch at every
            forward pass (False; the reference and the "no prefix KV reuse" baseline).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    allow_images: bool = True
    max_images: int | None = None
    stop_at_eos: bool = True
    scheduler: str = "ddpm"
    num_steps: int | None = None
    guidance_scale: float | None = 3.0
    timestep_spacing: str = "leading"
    eta: float = 0.0
    clip_sample_range: float | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} = {getattr(self, name)!r} {why}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be an integer >= 0")
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= max(self.max_new_tokens, 0):
            raise bad("min_new_tokens", f"must be an integer in [0, max_new_tokens = {self.max_new_tokens}]")
        if not is_finite_real(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", "must be None or an integer >= 1")
        if self.max_images is not None and (not is_int(self.max_images) or self.max_images < 0):
            raise bad("max_images", "must be None or an integer >= 0")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"must be one of {SCHEDULERS}")
        if self.num_steps is not None and (not is_int(self.num_steps) or self.num_steps < 1):
            raise bad("num_steps", "must be None or an integer >= 1")
        if self.guidance_scale is not None and not is_finite_real(self.guidance_scale):
            raise bad("guidance_scale", "must be None or a finite number")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise bad("timestep_spacing", f"must be one of {TIMESTEP_SPACINGS}")
        if not is_finite_real(self.eta) or self.eta < 0:
            raise bad("eta", "must be a finite number >= 0")
        if self.eta > 0 and self.scheduler != "ddim":
            raise bad("eta", "is a DDIM option; use scheduler='ddim'")
        if self.clip_sample_range is not None and (
            not is_finite_real(self.clip_sample_range) or self.clip_sample_range <= 0
        ):
            raise bad("clip_sample_range", "must be None or a finite number > 0")

    @property
    def steps(self) -> int:
        return self.num_steps if self.num_steps is not None else DEFAULT_STEPS[self.scheduler]

    def with_options(self, **options: Any) -> SamplingConfig:
        """A validated copy with some fields changed; unknown names raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown}; valid: {sorted(known)}")
        return replace(self, **options)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- generators
def row_generators(
    generator: torch.Generator | Sequence[torch.Generator] | int | None, rows: int
) -> list[torch.Generator]:
    """One CPU generator per row (see the module docstring for the rules)."""
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (rows,), generator=generator).tolist()
        return [torch.Generator().manual_seed(int(s)) for s in seeds]
    if generator is None:
        seeds = torch.randint(0, 2**62, (rows,)).tolist()
        return [torch.Generator().manual_seed(int(s)) for s in seeds]
    if is_int(generator):
        return [torch.Generator().manual_seed(generator + i) for i in range(rows)]
    gens = list(generator)
    if len(gens) != rows:
        raise ValueError(f"generator: got {len(gens)} generators for {rows} prompts; pass one per prompt")
    for i, g in enumerate(gens):
        if not isinstance(g, torch.Generator):
            raise ValueError(f"generator[{i}] is a {type(g).__name__}, not a torch.Generator")
        if g.device.type != "cpu":
            raise ValueError(f"generator[{i}] is on {g.device}; per-row generators must be CPU generators")
    return gens


# ---------------------------------------------------------------------- tokens
def sample_token(
    logits: torch.Tensor, banned: Sequence[int], temperature: float, top_k: int | None, generator
) -> int:
    """One token id from (V,) logits; ``banned`` ids are never chosen. Greedy when temperature == 0."""
    x = logits.detach().float().cpu().clone()
    if banned:
        x[list(banned)] = -math.inf
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(x))
    x = x / temperature
    if top_k is not None and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = torch.where(x < kth, torch.full_like(x, -math.inf), x)
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------- diffusers schedulers
def make_scheduler(
    name: str,
    num_train_timesteps: int,
    num_steps: int,
    timestep_spacing: str = "leading",
    schedule=None,
    clip_sample_range: float | None = None,
    prediction_type: str = "epsilon",
):
    """A diffusers DDPM/DDIM scheduler set up like training: squaredcos_cap_v2, and the model's
    ``prediction_type`` ("epsilon" or "v_prediction").

    ``clip_sample`` is off unless ``clip_sample_range`` is given: our latents are VAE latents scaled to
    unit variance, not pixels in [-1, 1], so diffusers' default range of 1 would cut real values.
    When ``schedule`` (a ``transfusion.diffusion.NoiseSchedule``) is given, the scheduler's cumulative
    alphas are checked against it.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=clip_sample_range is not None,
        clip_sample_range=1.0 if clip_sample_range is None else float(clip_sample_range),
        timestep_spacing=timestep_spacing,
    )
    if name == "ddpm":
        sched = DDPMScheduler(**common, variance_type="fixed_small")
    elif name == "ddim":
        sched = DDIMScheduler(**common, set_alpha_to_one=True)
    else:
        raise ValueError(f"scheduler = {name!r} must be one of {SCHEDULERS}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps = {num_steps} exceeds num_train_timesteps = {num_train_timesteps}")
    sched.set_timesteps(num_steps)
    if schedule is not None and not torch.allclose(
        sched.alphas_cumprod.float(), schedule.alphas_cumprod.float(), rtol=0, atol=1e-6
    ):
        raise ValueError("the diffusers scheduler's alphas_cumprod differ from the model's noise schedule")
    return sched


__all__ = [
    "DEFAULT_STEPS",
    "SCHEDULERS",
    "SamplingConfig",
    "make_scheduler",
    "row_generators",
    "sample_token",
]
