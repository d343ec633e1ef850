"""Data preparation shared by the model families: the dataset, the text tokenizer, the quick
autoencoder (trained once and cached), and the latents (VAE) or codes (VQ) of every example.

A family's ``prepare_data`` gets a ``RunContext`` and uses these steps. Rank 0 does the expensive work
(training the autoencoder, encoding the dataset) and writes caches; the other ranks wait at a barrier and
read them. The cache (``train.cache_dir``, default ``$TRANSFUSION_CACHE`` or
``~/.cache/transfusion-bench``) is keyed by a hash of the autoencoder config and the data, and every cache
entry appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from transfusion.config import ModelConfig
from transfusion.packing import SpecialTokens
from transfusion.train_config import ConfigError, TrainConfig
from transfusion.training_data import StreamConfig, pool_latents

T = TypeVar("T")


@dataclass
class RunContext:
    """Handed to a family's ``prepare_data``."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    out_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    resume: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 first, then on the other ranks: rank 0 fills a cache the others read."""
        if not self.is_main:
            self.barrier()
        out = fn()
        if self.is_main:
            self.barrier()
        return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRANSFUSION_CACHE") or Path.home() / ".cache" / "transfusion-bench")


def resolve_cache_dir(train_cfg: TrainConfig) -> Path | None:
    if train_cfg.cache_dir == "none":
        return None
    return Path(train_cfg.cache_dir) if train_cfg.cache_dir else default_cache_dir()


def build_dataset(train_cfg: TrainConfig, split: str = "train"):
    """The training dataset: the first ``train_examples`` items of ``split`` (errors name data.* keys)."""
    from torch.utils.data import Subset

    from transfusion.data import get_dataset

    opts = dict(train_cfg.dataset_options)
    n = train_cfg.train_examples
    if train_cfg.dataset == "shapes" and n and "length" not in opts:
        opts["length"] = n  # shapes is procedural: ask for exactly n items
    try:
        ds = get_dataset(train_cfg.dataset, split, **opts)
    except (ValueError, ImportError) as e:
        msg = str(e)
        key = msg.split(":", 1)[0]
        raise ConfigError(
            f"data.{msg}" if key.isidentifier() and key != "name" else f"train.dataset: {msg}"
        ) from e
    if n and len(ds) > n:
        ds = Subset(ds, range(n))
    return ds


def dataset_image_size(dataset) -> tuple[int, int]:
    img = dataset[0]["image"]
    return int(img.shape[-2]), int(img.shape[-1])


def read_captions_and_images(dataset, need_images: bool) -> tuple[list[str], torch.Tensor | None]:
    captions: list[str] = []
    images: list[torch.Tensor] = []
    for i in range(len(dataset)):
        item = dataset[i]
        captions.append(item["caption"])
        if need_images:
            images.append(item["image"])
    return captions, (torch.stack(images) if need_images else None)


def prepare_tokenizer(train_cfg: TrainConfig, model_cfg: ModelConfig, captions: list[str], ctx: RunContext):
    """The text tokenizer; saved to ``out/tokenizer.json`` (reloaded from there on resume)."""
    from transfusion.data import get_tokenizer, load_tokenizer

    saved = ctx.out_dir / "tokenizer.json"
    spec = train_cfg.tokenizer
    if ctx.resume and saved.exists():
        tok = load_tokenizer(saved)
    elif spec in ("byte", "bpe"):
        tok = get_tokenizer(spec, corpus=captions, vocab_size=model_cfg.vocab_size)
    else:
        tok = load_tokenizer(spec)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size = {model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tok.vocab_size}, train.tokenizer = {spec!r})"
        )
    if ctx.is_main and not (ctx.resume and saved.exists()):
        tmp = saved.with_name(".tokenizer.json.tmp")
        tok.save(tmp)
        os.replace(tmp, saved)
    return tok


def special_tokens(tok) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tok)


def quick_autoencoder_config(
    model_cfg: ModelConfig, image_size: int, options: dict[str, Any], kind: str = "vae"
):
    """The ``AutoencoderConfig`` of the quick autoencoder (``kind`` "vae" for Transfusion, "vq" for the
    discrete baseline): the autoencoder defaults, sized so that it maps ``image_size`` images to the model's
    latent shape, then the ``ae.*`` options. A VQ's codebook is ``model.codebook_size`` when that is set
    (``ae.codebook_size`` may repeat it, not contradict it), else ``ae.codebook_size`` or the default."""
    from transfusion.autoencoders import AutoencoderConfig

    names = {f.name for f in fields(AutoencoderConfig)}
    for key in options:
        if key not in names:
            raise ConfigError(f"ae.{key}: unknown autoencoder option; valid: {sorted(names)}")
    if options.get("kind", kind) != kind:
        raise ConfigError(
            f"ae.kind = {options['kind']!r}: this model family trains a {kind!r} autoencoder "
            "(the discrete family needs VQ codes, Transfusion continuous VAE latents)"
        )
    cfg = {
        "kind": kind,
        "image_size": image_size,
        "downsample": image_size // model_cfg.latent_size,
        "latent_channels": model_cfg.latent_channels,
        **options,
    }
    if kind == "vq" and model_cfg.codebook_size:
        if options.get("codebook_size", model_cfg.codebook_size) != model_cfg.codebook_size:
            raise ConfigError(
                f"ae.codebook_size = {options['codebook_size']!r} differs from model.codebook_size = "
                f"{model_cfg.codebook_size}; set one of them (model.codebook_size = 0 takes the VQ's)"
            )
        cfg["codebook_size"] = model_cfg.codebook_size
    try:
        return AutoencoderConfig(**cfg)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("AutoencoderConfig.", "ae.")
        raise ConfigError(msg if msg.startswith("ae.") else f"ae: {msg}") from None


def _ae_config_dict(ae_cfg) -> dict[str, Any]:
    if dataclasses.is_dataclass(ae_cfg):
        return json.loads(json.dumps(dataclasses.asdict(ae_cfg), default=str))
    return {"repr": repr(ae_cfg)}


def prepare_autoencoder(
    ctx: RunContext, dataset, image_size: int, kind: str = "vae"
) -> tuple[Path, dict[str, Any]]:
    """The folder of the run's autoencoder (``TrainConfig.autoencoder`` "auto" or a PATH) and its info.

    ``auto`` trains a quick autoencoder of ``kind`` into ``out/autoencoder`` (rank 0; others wait) or copies
    the one cached under ``cache_dir/autoencoders/<hash of its config and the data>``; ``PATH`` is used as
    given.
    """
    tc, mc = ctx.train_cfg, ctx.model_cfg
    spec = tc.autoencoder
    cache = resolve_cache_dir(tc)
    run_ae = ctx.out_dir / "autoencoder"
    if spec == "auto":
        from transfusion import autoencoders as aem

        ae_cfg = quick_autoencoder_config(mc, image_size, tc.autoencoder_options, kind=kind)
        key_src = {
            "autoencoder": _ae_config_dict(ae_cfg),
            "dataset": tc.dataset,
            "dataset_options": tc.dataset_options,
            "train_examples": tc.train_examples,
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
        cached = cache / "autoencoders" / key if cache else None
        if ctx.is_main and not run_ae.exists():
            if cached is not None and cached.exists():
                _copy_dir(cached, run_ae)
                print(f"[train] reusing the cached autoencoder {cached}", file=sys.stderr)
            else:
                print(f"[train] training a quick autoencoder ({kind}) into {run_ae}", file=sys.stderr)
                t0 = time.time()
                partial_dir = run_ae.with_name("autoencoder.partial")
                shutil.rmtree(partial_dir, ignore_errors=True)
                aem.train_autoencoder(ae_cfg, dataset, partial_dir, ctx.device, progress=tc.progress)
                os.replace(partial_dir, run_ae)
                print(f"[train] autoencoder trained in {time.time() - t0:.1f}s", file=sys.stderr)
                if cached is not None:
                    _copy_dir(run_ae, cached)
        ctx.barrier()
        ae_path = run_ae
        info: dict[str, Any] = {
            "source": "auto",
            "cache_key": key,
            "cached_at": str(cached) if cached else None,
        }
    else:
        ae_path = Path(spec)
        info = {"source": "path"}
    return ae_path, info


def _latent_cache_dir(ctx: RunContext) -> Path:
    cache = resolve_cache_dir(ctx.train_cfg)
    return (cache / "latents") if cache else (ctx.out_dir / "latents")


def prepare_latents(
    ctx: RunContext, dataset, images: torch.Tensor | None, image_size: int
) -> tuple[torch.Tensor, ModelConfig, dict[str, Any]]:
    """Diffusion-ready (scaled) latents of every example, from ``TrainConfig.autoencoder``.

    ``auto`` / ``PATH``: a VAE from ``prepare_autoencoder`` (with a PATH the model's latent shape is taken
    from it); ``pool`` uses ``pool_latents``.
    """
    tc, mc = ctx.train_cfg, ctx.model_cfg
    spec = tc.autoencoder
    if spec == "pool":
        assert images is not None
        lat = pool_latents(images, mc.latent_channels, mc.latent_size, seed=tc.seed)
        return lat, mc, {"source": "pool", "latent_shape": list(lat.shape[1:])}

    from transfusion import autoencoders as aem

    ae_path, info = prepare_autoencoder(ctx, dataset, image_size, kind="vae")
    ae = aem.load_autoencoder(ae_path)
    if ae.kind != "vae":
        raise ConfigError(
            f"train.autoencoder = {spec!r} is a {ae.kind!r} autoencoder; Transfusion needs a VAE's "
            "continuous latents (a VQ autoencoder is for --model discrete)"
        )
    C, h, w = (int(x) for x in ae.latent_shape)
    if h != w:
        raise ConfigError(f"train.autoencoder: latents are {h}x{w}; the model needs square latents")
    if (C, h) != (mc.latent_channels, mc.latent_size):
        if spec == "auto":
            raise ConfigError(
                f"train.autoencoder: the quick autoencoder gives latents {(C, h, w)}; the model expects "
                f"({mc.latent_channels}, {mc.latent_size}, {mc.latent_size}); check ae.* options"
            )
        try:
            mc = mc.replace(latent_channels=C, latent_size=h)
        except ValueError as e:
            raise ConfigError(f"{e} (latent shape {(C, h, w)} from train.autoencoder = {spec!r})") from e
    lat_dir = _latent_cache_dir(ctx)
    ae = ae.to(ctx.device)
    # ``encode`` (hence the cache) returns latents already multiplied by the VAE's scaling factor.
    lat = ctx.main_first(
        lambda: aem.cached_latents(ae, dataset, lat_dir, progress=tc.progress and ctx.is_main)
    ).float()
    scale = float(getattr(ae, "scaling_factor", 1.0))
    info.update(path=str(ae_path), latent_shape=[C, h, w], scaling_factor=scale)
    return lat, mc, info


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy a directory so that ``dst`` appears complete or not at all."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    try:
        os.replace(tmp, dst)
    except OSError:  # someone else made it first
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_codes(
    ctx: RunContext, dataset, image_size: int
) -> tuple[torch.Tensor, ModelConfig, dict[str, Any]]:
    """VQ codes (int64, (n, h, w)) of every example, from ``TrainConfig.autoencoder`` ("auto": a quick VQ
    trained and cached like the quick VAE; PATH: a saved VQ autoencoder). Returns the model config with
    ``codebook_size`` (and, for a PATH, ``latent_size`` = the code grid side) taken from the autoencoder."""
    from transfusion import autoencoders as aem

    tc, mc = ctx.train_cfg, ctx.model_cfg
    spec = tc.autoencoder
    ae_path, info = prepare_autoencoder(ctx, dataset, image_size, kind="vq")
    ae = aem.load_autoencoder(ae_path)
    if ae.kind != "vq":
        raise ConfigError(
            f"train.autoencoder = {spec!r} is a {ae.kind!r} autoencoder; the discrete family needs a VQ "
            "autoencoder (transfusion autoencoder train --kind vq)"
        )
    h, w = (int(x) for x in ae.code_shape)
    K = int(ae.codebook_size)
    if h != w:
        raise ConfigError(f"train.autoencoder: codes are {h}x{w}; the model needs square code grids")
    if mc.codebook_size and mc.codebook_size != K:
        raise ConfigError(
            f"model.codebook_size = {mc.codebook_size} but the VQ autoencoder ({spec!r}) has {K} codes; "
            "leave model.codebook_size = 0 to take the autoencoder's"
        )
    if h != mc.latent_size and spec == "auto":
        raise ConfigError(
            f"train.autoencoder: the quick VQ gives {h}x{w} codes; the model expects "
            f"{mc.latent_size}x{mc.latent_size}; check ae.* options"
        )
    try:
        mc = mc.replace(codebook_size=K, latent_size=h)
    except ValueError as e:
        raise ConfigError(f"{e} (a {h}x{w} code grid from train.autoencoder = {spec!r})") from e
    ae = ae.to(ctx.device)
    codes = ctx.main_first(
        lambda: aem.cached_latents(ae, dataset, _latent_cache_dir(ctx), progress=tc.progress and ctx.is_main)
    )
    info.update(path=str(ae_path), kind="vq", code_shape=[h, w], codebook_size=K)
    return codes.long(), mc, info


def stream_config(tc: TrainConfig, mc: ModelConfig, patch_size: int) -> StreamConfig:
    """The data recipe of a run (the same for every family; ``patch_size``: positions per image side)."""
    return StreamConfig(
        seq_len=tc.seq_len,
        batch_rows=tc.batch_rows,
        patch_size=patch_size,
        caption_first_prob=tc.caption_first_prob,
        caption_dropout=mc.caption_dropout,
        seed=tc.seed,
        loss_after_dropped_caption=mc.loss_after_dropped_caption,
    )


def data_info(tc: TrainConfig, stream, image_size, tok, caption_ids, lat_info, t0: float) -> dict[str, Any]:
    """What config.json records under "data"."""
    return {
        "dataset": tc.dataset,
        "dataset_options": tc.dataset_options,
        "examples": len(stream),
        "image_size": list(image_size),
        "tokenizer": {"spec": tc.tokenizer, "vocab_size": tok.vocab_size, "path": "tokenizer.json"},
        "mean_caption_tokens": sum(map(len, caption_ids)) / len(caption_ids),
        "latents": lat_info,
        "prep_seconds": round(time.time() - t0, 2),
    }
