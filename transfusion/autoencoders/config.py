"""``AutoencoderConfig``: architecture and training recipe of the image autoencoders.

One config describes either family:

* ``kind="vae"``: a diffusers ``AutoencoderKL`` whose continuous latents the Transfusion model diffuses;
* ``kind="vq"``: a diffusers ``VQModel`` whose codebook indices the discrete (Chameleon-style) baseline
  models as extra vocabulary.

Both are built from the same encoder/decoder description (``block_out_channels``, ``layers_per_block``,
``norm_num_groups``, ``downsample``), so the two families see images through the same architecture at
the same resolution. ``downsample`` must be a power of two and there is one encoder level per factor of
two plus the top one: ``len(block_out_channels) == log2(downsample) + 1``. Leave ``block_out_channels``
as ``None`` to get a small default of that length.

The config validates itself on construction, naming the bad field and its value, and round-trips through
JSON-able dicts (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from transfusion.value_checks import is_finite_real, is_int

KINDS = ("vae", "vq")
RECON_LOSSES = ("l1", "mse", "l1+mse")


def default_block_out_channels(downsample: int) -> tuple[int, ...]:
    """Small CPU-friendly widths: 16 channels for the two highest resolutions, 32 below (and at the
    lowest level): 4x -> (16, 16, 32), 8x -> (16, 16, 32, 32)."""
    levels = int(math.log2(downsample)) + 1
    channels = [16 if i < 2 else 32 for i in range(levels)]
    if levels > 1:
        channels[-1] = 32
    return tuple(channels)


@dataclass
class AutoencoderConfig:
    # ---- architecture (shared by the VAE and the VQ model)
    kind: str = "vae"  # "vae" (AutoencoderKL) | "vq" (VQModel)
    image_size: int = 32
    in_channels: int = 3
    downsample: int = 4  # spatial reduction: 32 px -> 8x8 latents
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] | None = None  # one per level; None -> default_block_out_channels
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block_attention: bool = False  # self-attention in the encoder/decoder mid block
    # ---- VQ only
    codebook_size: int = 1024
    vq_embed_dim: int | None = None  # codebook vector size; None -> latent_channels
    vq_loss_weight: float = 1.0  # weight of diffusers' VQ loss (codebook + commitment terms)
    codebook_init: bool = True  # initialise the codebook from encoder outputs of the first batch
    dead_code_restart: int = 50  # every N steps re-seed codes unused since the last restart (0: never)
    # ---- VAE only
    kl_weight: float = 1e-6  # on the KL summed over latent elements, divided by pixels per image
    # ---- training recipe
    recon_loss: str = "mse"
    steps: int = 800
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    grad_clip: float = 1.0
    train_images: int = 2048  # training images decoded once into memory and sampled from
    val_images: int = 256  # held-out images for the reconstruction PSNR
    scale_images: int = 512  # training images whose latent std sets the VAE scaling factor
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_out_channels is not None:
            if isinstance(self.block_out_channels, (str, bytes)) or not hasattr(
                self.block_out_channels, "__iter__"
            ):
                self._bad("block_out_channels", "must be a sequence of positive integers or None")
            self.block_out_channels = tuple(self.block_out_channels)
        if self.kind not in KINDS:
            self._bad("kind", f"must be one of {KINDS}")
        positive_ints = (
            "image_size", "in_channels", "downsample", "latent_channels", "layers_per_block",
            "norm_num_groups", "codebook_size", "steps", "batch_size", "train_images", "val_images",
            "scale_images",
        )  # fmt: skip
        for name in positive_ints:
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                self._bad(name, "must be a positive integer")
        for name in ("warmup_steps", "dead_code_restart", "seed"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                self._bad(name, "must be a non-negative integer")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not is_finite_real(value) or value <= 0:
                self._bad(name, "must be a positive finite number")
        for name in ("kl_weight", "vq_loss_weight"):
            value = getattr(self, name)
            if not is_finite_real(value) or value < 0:
                self._bad(name, "must be a finite number >= 0")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0.0 <= self.min_lr_ratio <= 1.0):
            self._bad("min_lr_ratio", "must be in [0, 1]")
        for name in ("mid_block_attention", "codebook_init"):
            if not isinstance(getattr(self, name), bool):
                self._bad(name, "must be a bool")
        if self.recon_loss not in RECON_LOSSES:
            self._bad("recon_loss", f"must be one of {RECON_LOSSES}")
        if self.downsample & (self.downsample - 1):
            self._bad("downsample", "must be a power of two (1, 2, 4, 8, ...)")
        if self.image_size % self.downsample:
            raise ValueError(
                f"AutoencoderConfig.image_size = {self.image_size} is not divisible by "
                f"downsample = {self.downsample}"
            )
        if self.vq_embed_dim is not None and (not is_int(self.vq_embed_dim) or self.vq_embed_dim <= 0):
            self._bad("vq_embed_dim", "must be a positive integer or None")
        levels = self.num_levels
        if self.block_out_channels is None:
            self.block_out_channels = default_block_out_channels(self.downsample)
        channels = self.block_out_channels
        if len(channels) != levels or any(not is_int(c) or c <= 0 for c in channels):
            self._bad(
                "block_out_channels",
                f"must be {levels} positive integers (log2(downsample = {self.downsample}) + 1 levels)",
            )
        bad = [c for c in channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"AutoencoderConfig.block_out_channels = {channels} has {bad[0]} not divisible by "
                f"norm_num_groups = {self.norm_num_groups}"
            )

    def _bad(self, name: str, why: str) -> None:
        raise ValueError(f"AutoencoderConfig.{name} = {getattr(self, name)!r} {why}")

    # ---------------------------------------------------------------- derived sizes
    @property
    def num_levels(self) -> int:
        return int(math.log2(self.downsample)) + 1

    @property
    def latent_size(self) -> int:
        """Height (= width) of the latent grid."""
        return self.image_size // self.downsample

    @property
    def embed_dim(self) -> int:
        """Channels of the tensors ``encode`` returns: latent_channels (VAE) or vq_embed_dim (VQ)."""
        if self.kind == "vq" and self.vq_embed_dim is not None:
            return self.vq_embed_dim
        return self.latent_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.embed_dim, self.latent_size, self.latent_size)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels or ())
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"AutoencoderConfig.{unknown[0]}: unknown field (value {d[unknown[0]]!r})")
        return cls(**d)

    def replace(self, **changes: Any) -> AutoencoderConfig:
        return dataclasses.replace(self, **changes)
