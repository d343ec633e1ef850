"""Model families: the seam between the training loop and a model.

A ``ModelFamily`` (registry: ``register_family`` / ``get_family``) says how to prepare the data, build the
model, and compute the loss parts of a step; the loop only sees ``LossPart`` s. Two are registered here,
and ``train.family`` (the CLI's ``--model``) picks one; nothing else in a run's configuration changes with
it:

* "transfusion": ``Transfusion`` on VAE latents; loss parts ``lm`` + lambda * ``diffusion``.
* "discrete": the Chameleon-style baseline (``transfusion.baseline.DiscreteLM``) on VQ codes: a quick VQ
  autoencoder (same architecture and downsampling as the quick VAE, ``ae.codebook_size`` codes, default
  1024) is trained and cached like the VAE, or loaded from ``train.autoencoder = PATH``; its codebook size
  is written to ``model.codebook_size`` in config.json (``model_requested`` keeps what was asked for, 0 =
  take it from the autoencoder), so checkpoints rebuild. The data stream is ``DiscreteStream``: the same
  example order, caption-first / image-first split and caption-dropout draws as Transfusion's for the
  same seed. The one LM loss is the optimised ``lm`` part; ``diffusion_loss`` is logged as 0 so
  metrics.jsonl has the same columns, plus ``text_loss`` and ``image_loss`` (the LM loss on text targets /
  on code targets, logged only). FLOPs are measured by the same ``FlopCounterMode`` step and the analytic
  count is Transfusion's with the enlarged vocabulary. ``model.qk_norm`` stays an option (default off for
  both families, the shared transformer): the paper's Chameleon uses QK-norm for stability at scale, but
  turning it on for one family only would make switching families change the transformer as well.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from transfusion.config import ModelConfig
from transfusion.diffusion import sample_timesteps
from transfusion.flops import analytic_step_flops
from transfusion.packing import PackedBatch
from transfusion.parallel import _unwrap
from transfusion.run_data import (
    RunContext,
    build_dataset,
    data_info,
    dataset_image_size,
    prepare_codes,
    prepare_latents,
    prepare_tokenizer,
    read_captions_and_images,
    special_tokens,
    stream_config,
)
from transfusion.train_config import ConfigError, TrainConfig
from transfusion.training_data import MixedModalStream, image_range, slice_rows


@dataclass
class LossPart:
    """One loss term of a step on this rank.

    ``value`` is the mean over this rank's ``count`` items (tokens, images); the global batch has
    ``total`` of them. The step objective is ``sum(weight * global mean)``.
    """

    name: str
    value: torch.Tensor
    count: int
    total: int
    weight: float = 1.0


def _z_loss_part(cfg: ModelConfig, out, total_lm: int) -> list[LossPart]:
    """The z-loss term (per LM target, like the LM loss), only when ``cfg.z_loss`` turns it on."""
    if cfg.z_loss <= 0:
        return []
    return [LossPart("z", out.z_loss, out.n_lm_tokens, total_lm, float(cfg.z_loss))]


@dataclass
class TrainingData:
    """What a family's data preparation hands the loop."""

    stream: Any  # iterator of global batches with peek(), state_dict() and load_state_dict()
    model_cfg: ModelConfig  # possibly updated (e.g. latent shape from a loaded autoencoder)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in config.json["data"]


class ModelFamily(ABC):
    """How one model family trains: its data, its model, its loss parts."""

    name: str = ""
    autoencoder_kind: str = "vae"  # the kind of quick autoencoder train.autoencoder = auto trains

    def check(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:  # noqa: B027
        """Cheap family-specific configuration checks (raise ConfigError); runs before any work."""

    @abstractmethod
    def prepare_data(self, ctx: RunContext) -> TrainingData: ...

    @abstractmethod
    def build_model(self, model_cfg: ModelConfig) -> nn.Module: ...

    @abstractmethod
    def loss_parts(
        self,
        model: nn.Module,
        batch: Any,
        rows: tuple[int, int],
        generator: torch.Generator,
        device: torch.device,
    ) -> list[LossPart]:
        """Forward pass on rows ``rows`` of the global ``batch``; random draws from ``generator`` must be
        made for the whole global batch (then sliced) so the result does not depend on the rank split."""

    def analytic_flops(self, model_cfg: ModelConfig, batch: Any) -> dict[str, float] | None:
        """Analytic FLOPs of one step on a global batch (recorded in config.json), if known."""
        return None


FAMILIES: dict[str, ModelFamily] = {}
# Families defined in other modules, imported on first use (their module calls ``register_family``).
# The two built-in families ("transfusion", "discrete") are registered in this module.
FAMILY_MODULES: dict[str, str] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if not family.name:
        raise ValueError("a model family needs a name")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES and name in FAMILY_MODULES:
        import importlib

        try:
            importlib.import_module(FAMILY_MODULES[name])
        except ImportError as e:
            raise ConfigError(f"train.family = {name!r}: cannot import {FAMILY_MODULES[name]} ({e})") from e
        if name not in FAMILIES:
            raise ConfigError(
                f"train.family = {name!r}: {FAMILY_MODULES[name]} registers no model family of that name "
                "(it must call transfusion.train.register_family)"
            )
    if name not in FAMILIES:
        raise ConfigError(
            f"train.family = {name!r} is not a registered model family; known: {sorted(FAMILIES)}"
        )
    return FAMILIES[name]


def _check_seq_len(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"train.seq_len = {train_cfg.seq_len} exceeds model.max_seq_len = {model_cfg.max_seq_len}"
        )


class TransfusionFamily(ModelFamily):
    name = "transfusion"

    def check(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
        _check_seq_len(model_cfg, train_cfg)

    def prepare_data(self, ctx: RunContext) -> TrainingData:
        tc, mc = ctx.train_cfg, ctx.model_cfg
        dataset = build_dataset(tc)
        H, W = dataset_image_size(dataset)
        t0 = time.time()
        captions, images = read_captions_and_images(dataset, need_images=tc.autoencoder == "pool")
        tok = prepare_tokenizer(tc, mc, captions, ctx)
        caption_ids = [tok.encode(c) for c in captions]
        stream_cfg = stream_config(tc, mc, patch_size=mc.patch_size)
        # Check that documents fit the rows before any expensive work (latent shape from the config).
        n_patch = mc.patches_per_image
        longest = max(len(c) for c in caption_ids) + 4 + n_patch
        if longest > tc.seq_len:
            raise ConfigError(
                f"train.seq_len = {tc.seq_len} is shorter than the longest document ({longest} tokens: "
                f"caption + {n_patch} image patches + 4 special tokens)"
            )
        latents, mc, lat_info = prepare_latents(ctx, dataset, images, H)
        stream = MixedModalStream(caption_ids, latents, stream_cfg, special_tokens(tok), mc.vocab_size)
        info = data_info(tc, stream, (H, W), tok, caption_ids, lat_info, t0)
        return TrainingData(stream=stream, model_cfg=mc, info=info)

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        from transfusion.transfusion_model import Transfusion

        return Transfusion(model_cfg)

    def loss_parts(self, model, batch: PackedBatch, rows, generator, device) -> list[LossPart]:
        cfg: ModelConfig = _unwrap(model).cfg
        a, b = rows
        N = batch.num_images
        timesteps = sample_timesteps(
            N,
            image_first=batch.image_first,
            num_timesteps=cfg.num_train_timesteps,
            noise_limit_t=cfg.noise_limit_t,
            generator=generator,
        )
        noise = torch.randn(batch.latents.shape, generator=generator)
        i0, i1 = image_range(batch, a, b)
        local = batch if (a, b) == (0, batch.batch_size) else slice_rows(batch, a, b)
        out = model(local.to(device), noise=noise[i0:i1].to(device), timesteps=timesteps[i0:i1].to(device))
        return [
            LossPart("lm", out.lm_loss, out.n_lm_tokens, int(batch.lm_mask.sum()), 1.0),
            LossPart("diffusion", out.diffusion_loss, i1 - i0, N, float(cfg.diffusion_lambda)),
            *_z_loss_part(cfg, out, int(batch.lm_mask.sum())),
        ]

    def analytic_flops(self, model_cfg: ModelConfig, batch: PackedBatch) -> dict[str, float]:
        return analytic_step_flops(model_cfg, batch).as_dict()


register_family(TransfusionFamily())


class DiscreteFamily(ModelFamily):
    """The Chameleon-style baseline: images as VQ codes in one causal LM (see the module docstring)."""

    name = "discrete"
    autoencoder_kind = "vq"

    def check(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
        _check_seq_len(model_cfg, train_cfg)
        spec = train_cfg.autoencoder
        if spec == "pool":
            raise ConfigError(
                "train.autoencoder = 'pool' gives continuous latents; the discrete family needs VQ codes "
                "(use 'auto' to train a quick VQ, or the PATH of a saved VQ autoencoder)"
            )
        if spec != "auto" and (Path(spec) / "autoencoder.json").is_file():
            try:
                from transfusion.autoencoders import read_metadata

                meta = read_metadata(spec)
            except (ImportError, OSError, ValueError):
                return  # reported when the autoencoder is loaded
            if meta.get("kind") != "vq":
                raise ConfigError(
                    f"train.autoencoder = {spec!r} is a {meta.get('kind')!r} autoencoder; the discrete "
                    "family needs a VQ autoencoder (transfusion autoencoder train --kind vq)"
                )
            K = meta.get("codebook_size")
            if model_cfg.codebook_size and K != model_cfg.codebook_size:
                raise ConfigError(
                    f"model.codebook_size = {model_cfg.codebook_size} but the VQ autoencoder {spec!r} has "
                    f"{K} codes; leave model.codebook_size = 0 to take the autoencoder's"
                )

    def prepare_data(self, ctx: RunContext) -> TrainingData:
        from transfusion.baseline import DiscreteStream, vocab_for

        tc, mc = ctx.train_cfg, ctx.model_cfg
        dataset = build_dataset(tc)
        H, W = dataset_image_size(dataset)
        t0 = time.time()
        captions, _ = read_captions_and_images(dataset, need_images=False)
        tok = prepare_tokenizer(tc, mc, captions, ctx)
        caption_ids = [tok.encode(c) for c in captions]
        if tc.autoencoder == "auto":  # before any expensive work (a PATH's code grid is known once loaded)
            _check_documents_fit(tc, caption_ids, mc.latent_size**2)
        codes, mc, lat_info = prepare_codes(ctx, dataset, H)
        _check_documents_fit(tc, caption_ids, int(codes.shape[1] * codes.shape[2]))
        stream = DiscreteStream(
            caption_ids, codes, stream_config(tc, mc, patch_size=1), vocab_for(mc), special_tokens(tok)
        )
        info = data_info(tc, stream, (H, W), tok, caption_ids, lat_info, t0)
        return TrainingData(stream=stream, model_cfg=mc, info=info)

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        from transfusion.baseline import DiscreteLM

        return DiscreteLM(model_cfg)

    def loss_parts(self, model, batch: PackedBatch, rows, generator, device) -> list[LossPart]:
        from transfusion.baseline import discrete_target_counts

        a, b = rows
        local = batch if (a, b) == (0, batch.batch_size) else slice_rows(batch, a, b)
        out = model(local.to(device))
        n_text, n_image = discrete_target_counts(batch, _unwrap(model).vocab)
        return [
            LossPart("lm", out.lm_loss, out.n_lm_tokens, int(batch.lm_mask.sum()), 1.0),
            # Logged only (weight 0): the same columns as Transfusion, and the LM loss split by target kind.
            LossPart("diffusion", out.diffusion_loss, 0, 0, 0.0),
            LossPart("text", out.text_loss, out.n_text_tokens, n_text, 0.0),
            LossPart("image", out.image_loss, out.n_image_tokens, n_image, 0.0),
            *_z_loss_part(_unwrap(model).cfg, out, int(batch.lm_mask.sum())),
        ]

    def analytic_flops(self, model_cfg: ModelConfig, batch: PackedBatch) -> dict[str, float]:
        from transfusion.baseline import discrete_analytic_step_flops

        return discrete_analytic_step_flops(model_cfg, batch).as_dict()


def _check_documents_fit(tc: TrainConfig, caption_ids: list[list[int]], codes_per_image: int) -> None:
    longest = max(len(c) for c in caption_ids) + 4 + codes_per_image
    if longest > tc.seq_len:
        raise ConfigError(
            f"train.seq_len = {tc.seq_len} is shorter than the longest document ({longest} tokens: caption + "
            f"{codes_per_image} image codes + 4 special tokens); raise train.seq_len (and model.max_seq_len) "
            "or use smaller code grids (model.latent_size)"
        )


register_family(DiscreteFamily())
