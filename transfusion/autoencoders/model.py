"""Building, wrapping, saving and loading the diffusers autoencoders.

``build_autoencoder(cfg)`` returns a freshly initialised diffusers ``AutoencoderKL`` (``kind="vae"``) or
``VQModel`` (``kind="vq"``); both get the same encoder/decoder arguments from ``diffusers_kwargs``.

``TrainedAutoencoder`` wraps a model with what the rest of the suite needs:

* ``encode(images) -> (N, C, h, w)`` latents. VAE: the posterior **mean** times ``scaling_factor``
  (deterministic, so caches and evaluations are reproducible); ``sample=True`` draws from the posterior
  instead. VQ: the quantised latents (codebook vectors), unscaled.
* ``decode(latents) -> images`` in ``[-1, 1]`` (the inverse of ``encode``; VQ latents are decoded as given,
  without re-quantising).
* VQ only: ``encode_codes(images) -> LongTensor (N, h, w)`` and ``decode_codes(codes) -> images``.

On disk an autoencoder is a folder: diffusers' ``save_pretrained`` output (``config.json`` and
``diffusion_pytorch_model.safetensors``) plus ``autoencoder.json`` (our config, scaling factor, metrics,
weights hash and provenance). ``save_autoencoder`` writes the folder under a temporary name and renames
it into place; ``load_autoencoder`` checks the weights hash before trusting the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfusion.autoencoders.config import AutoencoderConfig
from transfusion.provenance import atomic_write_json

META_NAME = "autoencoder.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FORMAT = "transfusion-autoencoder"
FORMAT_VERSION = 1


def _diffusers():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a dev/extra dependency
        raise ImportError("the autoencoders need diffusers (pip install 'diffusers>=0.30')") from e
    return diffusers


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image: ``(N, ...)`` pairs -> ``(N,)``.

    ``data_range`` is the span of valid pixel values, centred on 0 (2 for images in ``[-1, 1]``); ``pred``
    is clamped to that span first, since values outside it cannot be displayed.
    Identical images give a large finite value (MSE is floored at 1e-10), not ``inf``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    if pred.ndim < 2:
        raise ValueError(f"pred: expected a batch (N, ...), got shape {tuple(pred.shape)}")
    half = data_range / 2
    pred = pred.detach().float().clamp(-half, half)
    target = target.detach().float()
    mse = (pred - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(data_range**2 / mse)


def diffusers_kwargs(cfg: AutoencoderConfig) -> dict[str, Any]:
    """Encoder/decoder arguments shared verbatim by ``AutoencoderKL`` and ``VQModel``."""
    n = cfg.num_levels
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.image_size,
        "mid_block_add_attention": cfg.mid_block_attention,
    }


def build_autoencoder(cfg: AutoencoderConfig, seed: int | None = None) -> nn.Module:
    """A new diffusers model for ``cfg``; weights seeded by ``seed`` (default ``cfg.seed``)."""
    diffusers = _diffusers()
    kwargs = diffusers_kwargs(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        if cfg.kind == "vae":
            return diffusers.AutoencoderKL(**kwargs, scaling_factor=1.0, force_upcast=False)
        return diffusers.VQModel(
            **kwargs, num_vq_embeddings=cfg.codebook_size, vq_embed_dim=cfg.vq_embed_dim, scaling_factor=1.0
        )


def weights_sha256(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes, values), independent of the file format."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TrainedAutoencoder:
    """A VAE or VQ model plus its latent scaling factor, config and recorded metrics."""

    def __init__(
        self,
        model: nn.Module,
        config: AutoencoderConfig,
        scaling_factor: float = 1.0,
        metrics: dict[str, Any] | None = None,
        path: str | Path | None = None,
    ) -> None:
        if not (isinstance(scaling_factor, (int, float)) and scaling_factor > 0):
            raise ValueError(f"scaling_factor: must be a positive number, got {scaling_factor!r}")
        self.model = model.eval()
        self.config = config
        self.scaling_factor = float(scaling_factor)
        self.metrics = dict(metrics or {})
        self.path = Path(path) if path is not None else None

    # ---------------------------------------------------------------- description
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, h, w)`` of what ``encode`` returns."""
        return self.config.latent_shape

    @property
    def code_shape(self) -> tuple[int, int]:
        """Per-image shape ``(h, w)`` of the VQ code grid (also the VAE latent grid)."""
        return (self.config.latent_size, self.config.latent_size)

    @property
    def codebook_size(self) -> int | None:
        return self.config.codebook_size if self.kind == "vq" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TrainedAutoencoder:
        self.model.to(device)
        return self

    def fingerprint(self) -> str:
        """Identity of this autoencoder for caches: config, scaling factor and the weights themselves."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        h.update(repr(self.scaling_factor).encode())
        h.update(weights_sha256(self.model).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        extra = f", codebook_size={self.codebook_size}" if self.kind == "vq" else ""
        return (
            f"TrainedAutoencoder(kind={self.kind!r}, latent_shape={self.latent_shape}{extra}, "
            f"scaling_factor={self.scaling_factor:.4g}, path={str(self.path) if self.path else None!r})"
        )

    # ---------------------------------------------------------------- encode / decode
    def _images(self, images: torch.Tensor) -> torch.Tensor:
        size, c = self.config.image_size, self.config.in_channels
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, size, size):
            raise ValueError(f"images: expected (N, {c}, {size}, {size}), got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def _latents(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents: expected (N, {', '.join(map(str, self.latent_shape))}), got {tuple(latents.shape)}"
            )
        return latents.to(self.device, torch.float32)

    def _need_vq(self, what: str) -> None:
        if self.kind != "vq":
            raise TypeError(f"{what}: only a VQ autoencoder has codes (this one is kind={self.kind!r})")

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in ``[-1, 1]`` -> latents ``(N, C, h, w)`` on the model's device.

        VAE: ``scaling_factor * posterior.mean`` (or a posterior sample when ``sample=True``), so the
        latents have std ~1 over the training data. VQ: the quantised vectors (``sample`` is ignored).
        """
        x = self._images(images)
        if self.kind == "vae":
            dist = self.model.encode(x).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mean
            return z * self.scaling_factor
        h = self.model.encode(x).latents
        quant, _, _ = self.model.quantize(h)
        return quant

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, C, h, w)`` as ``encode`` returns them -> images ``(N, 3, H, W)`` in ``[-1, 1]``."""
        z = self._latents(latents)
        if self.kind == "vae":
            out = self.model.decode(z / self.scaling_factor).sample
        else:
            out = self.model.decode(z, force_not_quantize=True).sample
        return out.clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """VQ only: images -> codebook indices, ``LongTensor (N, h, w)`` in ``[0, codebook_size)``."""
        self._need_vq("encode_codes")
        h = self.model.encode(self._images(images)).latents
        _, _, (_, _, idx) = self.model.quantize(h)
        return idx.reshape(h.shape[0], h.shape[2], h.shape[3]).long()

    @torch.no_grad()
    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ only: indices ``(N, h, w)`` -> quantised latents ``(N, C, h, w)`` (what ``encode`` returns)."""
        self._need_vq("codes_to_latents")
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.code_shape:
            raise ValueError(
                f"codes: expected (N, {self.code_shape[0]}, {self.code_shape[1]}), got {tuple(codes.shape)}"
            )
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(
                f"codes: values must be in [0, {self.config.codebook_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        n, hh, ww = codes.shape
        shape = (n, hh, ww, self.config.embed_dim)
        return self.model.quantize.get_codebook_entry(codes.to(self.device).long().reshape(-1), shape)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ only: indices ``(N, h, w)`` -> images ``(N, 3, H, W)`` in ``[-1, 1]``."""
        return self.decode(self.codes_to_latents(codes))


# -------------------------------------------------------------------- save / load


def save_autoencoder(
    ae: TrainedAutoencoder, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``ae`` to the folder ``out_dir`` atomically (temporary folder, then rename); returns the path.

    An existing folder at ``out_dir`` is replaced. ``extra`` is merged into ``autoencoder.json``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        ae.model.save_pretrained(tmp, safe_serialization=True)
        if not (tmp / WEIGHTS_NAME).is_file():
            raise RuntimeError(f"{tmp}: diffusers did not write {WEIGHTS_NAME}")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": ae.kind,
            "config": ae.config.to_dict(),
            "scaling_factor": ae.scaling_factor,
            "latent_shape": list(ae.latent_shape),
            "codebook_size": ae.codebook_size,
            "weights_sha256": weights_sha256(ae.model),
            "metrics": ae.metrics,
        }
        meta.update(extra or {})
        atomic_write_json(tmp / META_NAME, meta)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ae.path = out_dir
    return out_dir


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The parsed ``autoencoder.json`` of a saved autoencoder folder (errors name the path)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no saved autoencoder here (not a directory)")
    meta_file = path / META_NAME
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a saved autoencoder (missing {META_NAME})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_file}: corrupt autoencoder metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: not a {FORMAT} metadata file")
    return meta


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> TrainedAutoencoder:
    """Load a folder written by ``train_autoencoder`` / ``save_autoencoder`` (local files only).

    Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` for a corrupt one (bad
    metadata, unreadable weights, or weights whose hash differs from the one recorded); both name the path.
    """
    path = Path(path)
    meta = read_metadata(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path}: not a saved autoencoder (missing {WEIGHTS_NAME})")
    try:
        cfg = AutoencoderConfig.from_dict(meta["config"])
        scaling = float(meta["scaling_factor"])
        expected_hash = meta["weights_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / META_NAME}: corrupt autoencoder metadata ({e})") from e
    diffusers = _diffusers()
    cls = diffusers.AutoencoderKL if cfg.kind == "vae" else diffusers.VQModel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except Exception as e:  # diffusers raises OSError / EnvironmentError / safetensors errors
        raise ValueError(f"{path}: cannot load the autoencoder weights ({type(e).__name__}: {e})") from e
    if weights_sha256(model) != expected_hash:
        raise ValueError(
            f"{path}: the weights do not match the hash recorded in {META_NAME} (corrupt or edited)"
        )
    ae = TrainedAutoencoder(model, cfg, scaling, metrics=meta.get("metrics"), path=path)
    return ae.to(device)
