"""The Transfusion family: one transformer, a text embedding + LM head, and an image adapter.

Training forward pass on a ``PackedBatch`` (see ``transfusion.packing``):

1. Timesteps: uniform on [0, T), image-first images on [0, noise_limit_t] (noise limiting; off when
   ``cfg.noise_limit_t`` is None). Noise: standard normal. Both can be passed in (tests, evaluation).
2. Inputs: token embeddings at text positions (<BOI>/<EOI> included); at each image's patch positions
   the adapter's encoding of the noised latent x_t (with its timestep embedding).
3. The shared transformer runs with the batch's layout (causal text, bidirectional inside each image)
   or ``layout.causal_only()`` when ``cfg.causal_only_images`` (the attention ablation).
4. Losses: ``lm_loss`` = mean cross-entropy over the positions with an LM target; ``diffusion_loss`` =
   MSE between the adapter's decoded eps prediction and the true noise, per image then mean over images;
   ``loss = lm_loss + cfg.diffusion_lambda * diffusion_loss``, plus ``cfg.z_loss * z_loss`` when the
   z-loss is on (``transfusion.z_loss``; off by default).

Caption dropout (classifier-free guidance) is done in data prep (``pack_documents(caption_dropout=...)``),
not here: the model trains on whatever captions the batch holds.

All inputs are checked before any compute; errors are ValueErrors naming the field and the value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.adapters import AdapterContext, build_adapter
from transfusion.config import ModelConfig
from transfusion.diffusion import (
    NoiseSchedule,
    diffusion_loss,
    diffusion_target,
    loss_weights,
    sample_timesteps,
)
from transfusion.layout import AttentionLayout
from transfusion.model import KVCache, Transformer
from transfusion.packing import PackedBatch
from transfusion.z_loss import z_loss


@dataclass
class TransfusionOutput:
    """Losses of one forward pass, plus what evaluation may want to look at."""

    loss: torch.Tensor  # lm_loss + lambda * diffusion_loss (+ cfg.z_loss * z_loss)
    lm_loss: torch.Tensor
    diffusion_loss: torch.Tensor
    timesteps: torch.Tensor  # (N,) the timesteps used for the images
    # (N, C, H, W) the image head's prediction: the noise (cfg.prediction_type "epsilon") or v; None without
    # images
    eps_pred: torch.Tensor | None
    n_lm_tokens: int
    n_images: int
    hidden: torch.Tensor | None = None  # (B, L, dim) final hidden states when asked for
    z_loss: torch.Tensor | None = None  # mean logsumexp^2 of the LM logits, when cfg.z_loss > 0

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "lm_loss": float(self.lm_loss.detach()),
            "diffusion_loss": float(self.diffusion_loss.detach()),
        }


class Transfusion(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # untied from tok_emb
        self.adapter = build_adapter(cfg)
        self.schedule = NoiseSchedule(cfg.num_train_timesteps)
        nn.init.normal_(self.tok_emb.weight, std=cfg.init_std)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    # ------------------------------------------------------------------ checks
    def validate(
        self, batch: PackedBatch, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None
    ) -> None:
        """Raise ValueError (naming the field and value) on any bad input; runs no model compute."""
        cfg = self.cfg
        tokens = batch.tokens
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(
                f"tokens must be a (B, L) integer tensor; got {tokens.dtype} {tuple(tokens.shape)}"
            )
        B, L = tokens.shape
        if cfg.max_seq_len < L:
            raise ValueError(
                f"tokens: sequence length {L} exceeds ModelConfig.max_seq_len = {cfg.max_seq_len}"
            )
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"tokens: id {bad} is outside [0, vocab_size = {cfg.vocab_size})")
        layout = batch.layout
        if (layout.batch_size, layout.q_len, layout.kv_len) != (B, L, L):
            raise ValueError(
                f"layout is (batch={layout.batch_size}, q_len={layout.q_len}, kv_len={layout.kv_len}); "
                f"tokens are ({B}, {L})"
            )
        if batch.patch_size != cfg.patch_size:
            raise ValueError(
                f"batch.patch_size = {batch.patch_size} differs from "
                f"ModelConfig.patch_size = {cfg.patch_size}"
            )
        N = batch.num_images
        if N == 0:
            return
        lat = batch.latents
        if lat.dim() != 4 or lat.shape[0] != N:
            raise ValueError(f"latents must be (N={N}, C, H, W); got shape {tuple(lat.shape)}")
        if lat.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"latents: {lat.shape[1]} channels; ModelConfig.latent_channels = {cfg.latent_channels}"
            )
        H, W = lat.shape[-2:]
        k = cfg.patch_size
        if H % k or W % k:
            raise ValueError(f"latents: (H, W) = ({H}, {W}) is not divisible by patch_size = {k}")
        if not bool(torch.isfinite(lat).all()):
            raise ValueError("latents contain NaN or Inf")
        n = (H // k) * (W // k)
        for i, (r, s, e) in enumerate(batch.image_spans):
            if e - s != n:
                raise ValueError(
                    f"image_spans[{i}] = ({r}, {s}, {e}) has {e - s} positions; latents give {n} patches"
                )
        if noise is not None:
            if noise.shape != lat.shape:
                raise ValueError(f"noise: shape {tuple(noise.shape)} differs from latents {tuple(lat.shape)}")
            if not bool(torch.isfinite(noise).all()):
                raise ValueError("noise contains NaN or Inf")
        if timesteps is not None:
            if timesteps.shape != (N,) or timesteps.is_floating_point():
                raise ValueError(
                    f"timesteps: need ({N},) integers; got {timesteps.dtype} {tuple(timesteps.shape)}"
                )
            lo_t, hi_t = int(timesteps.min()), int(timesteps.max())
            if lo_t < 0 or hi_t >= cfg.num_train_timesteps:
                bad = lo_t if lo_t < 0 else hi_t
                raise ValueError(
                    f"timesteps: {bad} is outside [0, num_train_timesteps = {cfg.num_train_timesteps})"
                )

    # ------------------------------------------------------------------ pieces (also used by generation)
    def sample_timesteps(self, batch: PackedBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps for the batch's images, with noise limiting for image-first ones."""
        return sample_timesteps(
            batch.num_images,
            image_first=batch.image_first,
            num_timesteps=self.cfg.num_train_timesteps,
            noise_limit_t=self.cfg.noise_limit_t,
            generator=generator,
            device=batch.latents.device,
        )

    def embed(
        self, tokens: torch.Tensor, patch_index: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, AdapterContext | None]:
        """Transformer inputs (B, L, dim): token embeddings, with image positions from the adapter.

        ``patch_index`` (N, n) holds flat (B * L) positions of each image's patches, in raster order.
        """
        x = self.tok_emb(tokens)
        if patch_index.numel() == 0:
            return x, None
        B, L, D = x.shape
        img, ctx = self.adapter.encode(x_t, timesteps)  # (N, n, D)
        x = x.reshape(B * L, D).index_copy(0, patch_index.reshape(-1), img.reshape(-1, D).to(x.dtype))
        return x.view(B, L, D), ctx

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def run_transformer(
        self,
        x: torch.Tensor,
        layout: AttentionLayout,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        commit: bool = True,
    ) -> torch.Tensor:
        """The shared transformer, applying the causal-only ablation when configured."""
        if self.cfg.causal_only_images:
            layout = layout.causal_only()
        return self.transformer(x, layout, positions=positions, cache=cache, commit=commit)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        batch: PackedBatch,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_hidden: bool = False,
    ) -> TransfusionOutput:
        """Both losses on a packed batch; ``noise`` (N, C, H, W) and ``timesteps`` (N,) may be fixed."""
        self.validate(batch, noise, timesteps)
        cfg = self.cfg
        N = batch.num_images
        device = batch.tokens.device
        if N:
            x0 = batch.latents
            if timesteps is None:
                timesteps = self.sample_timesteps(batch, generator)
            if noise is None:
                noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            timesteps = timesteps.to(device)
            x_t = self.schedule.add_noise(x0, noise, timesteps)
            patch_index = batch.patch_index()
        else:
            timesteps = torch.zeros(0, dtype=torch.long, device=device)
            x_t = batch.latents
            patch_index = torch.zeros(0, 0, dtype=torch.long, device=device)

        x, ctx = self.embed(batch.tokens, patch_index, x_t, timesteps)
        hidden = self.run_transformer(x, batch.layout, positions=batch.positions)
        flat = hidden.reshape(-1, hidden.shape[-1])

        # Only positions with a target go through the LM head (saves the vocab-sized matmul elsewhere).
        mask = batch.lm_mask.reshape(-1)
        n_lm = int(mask.sum())
        z = None
        if n_lm:
            logits = self.lm_head(flat[mask])
            lm_loss = F.cross_entropy(logits.float(), batch.lm_targets.reshape(-1)[mask])
            if cfg.z_loss > 0:
                z = z_loss(logits)
        else:
            lm_loss = flat.sum() * 0.0
            if cfg.z_loss > 0:
                z = lm_loss

        eps_pred = None
        if N:
            img_hidden = flat[patch_index.reshape(-1)].view(N, patch_index.shape[1], -1)
            eps_pred = self.adapter.decode(img_hidden, ctx)
            target = diffusion_target(cfg.prediction_type, self.schedule, batch.latents, noise, timesteps)
            weights = loss_weights(
                self.schedule, timesteps, cfg.prediction_type, cfg.diffusion_loss_weighting, cfg.min_snr_gamma
            )
            diff_loss = diffusion_loss(eps_pred, target, weights)
        else:
            diff_loss = flat.sum() * 0.0
        loss = lm_loss + cfg.diffusion_lambda * diff_loss
        if z is not None:
            loss = loss + cfg.z_loss * z
        return TransfusionOutput(
            loss=loss,
            lm_loss=lm_loss,
            diffusion_loss=diff_loss,
            timesteps=timesteps,
            eps_pred=eps_pred,
            n_lm_tokens=n_lm,
            n_images=N,
            hidden=hidden if return_hidden else None,
            z_loss=z,
        )

    def num_params(self) -> dict[str, int]:
        """Parameter counts by part."""
        count = lambda m: sum(p.numel() for p in m.parameters())
        parts = {
            "transformer": count(self.transformer),
            "text": count(self.tok_emb) + count(self.lm_head),
            "adapter": count(self.adapter),
        }
        parts["total"] = sum(parts.values())
        return parts


__all__ = ["Transfusion", "TransfusionOutput"]
