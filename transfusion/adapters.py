"""Image adapters: latent images <-> transformer positions, with timestep conditioning.

A latent image (C, H, W) becomes (H/k) * (W/k) positions, one per k x k patch in raster order
(row-major over the patch grid; inside a patch the vector is ordered channel, row, column).

Two adapters (paper section 3, Table 7):
    ``LinearAdapter``: patch -> Linear -> dim, plus a timestep embedding added to every patch; the
        output head is one Linear dim -> patch.
    ``UNetAdapter``: diffusers U-Net down blocks (ResNet blocks conditioned on the timestep) run on the
        whole latent image, then the feature map is patchified and projected to dim. On the way out the
        positions are projected back, unpatchified, and run through U-Net up blocks that take the skip
        connections of the same image's down path, ending in the latent channels.

Both share one interface: ``encode(x_t, t) -> (tokens (N, n, dim), ctx)`` and
``decode(hidden (N, n, dim), ctx) -> (N, C, H, W)``; ``ctx`` carries what decode needs from encode
(the image shape, the timestep embedding, the U-Net skips).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from transfusion.config import ModelConfig


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/k) * (W/k), C * k * k), patches in raster order."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be (B, C, H, W); got shape {tuple(latents.shape)}")
    B, C, H, W = latents.shape
    k = patch_size
    if H % k or W % k:
        raise ValueError(f"latents spatial size (H, W) = ({H}, {W}) is not divisible by patch_size = {k}")
    x = latents.reshape(B, C, H // k, k, W // k, k)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // k) * (W // k), C * k * k)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Exact inverse of ``patchify``: (B, n, C * k * k) -> (B, C, height, width)."""
    k = patch_size
    if height % k or width % k:
        raise ValueError(f"(height, width) = ({height}, {width}) is not divisible by patch_size = {k}")
    B, n, d = patches.shape
    h, w = height // k, width // k
    if n != h * w or d % (k * k):
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not tile a {height}x{width} image "
            f"with {k}x{k} patches"
        )
    C = d // (k * k)
    x = patches.reshape(B, h, w, C, k, k).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (N, dim) of (possibly fractional) timesteps t (N,): [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> MLP (Linear, SiLU, Linear)."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim))


@dataclass
class AdapterContext:
    """What ``decode`` needs from ``encode`` of the same images."""

    height: int
    width: int
    temb: torch.Tensor
    skips: tuple[torch.Tensor, ...] = ()


class ImageAdapter(nn.Module):
    """Interface shared by the adapters (see module docstring)."""

    patch_size: int

    def encode(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, AdapterContext]:
        raise NotImplementedError

    def decode(self, hidden: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        raise NotImplementedError

    def in_parameters(self) -> list[nn.Parameter]:
        """Parameters of the input side (latent -> positions)."""
        raise NotImplementedError

    def out_parameters(self) -> list[nn.Parameter]:
        """Parameters of the output side (positions -> latent)."""
        raise NotImplementedError


class LinearAdapter(ImageAdapter):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.in_proj = nn.Linear(cfg.patch_dim, cfg.dim)
        self.t_embed = TimestepEmbedder(cfg.timestep_freq_dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.patch_dim)

    def encode(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, AdapterContext]:
        temb = self.t_embed(t)
        tokens = self.in_proj(patchify(x_t, self.patch_size)) + temb[:, None]
        return tokens, AdapterContext(height=x_t.shape[-2], width=x_t.shape[-1], temb=temb)

    def decode(self, hidden: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        return unpatchify(self.out_proj(hidden), self.patch_size, ctx.height, ctx.width)

    def in_parameters(self) -> list[nn.Parameter]:
        return [*self.in_proj.parameters(), *self.t_embed.parameters()]

    def out_parameters(self) -> list[nn.Parameter]:
        return list(self.out_proj.parameters())


class UNetAdapter(ImageAdapter):
    """U-Net down blocks -> patchify -> dim; dim -> unpatchify -> U-Net up blocks (with skips).

    Level i of ``cfg.unet_channels`` is a diffusers ``DownBlock2D``; every level but the last halves the
    resolution, so the feature map is ``2**(levels-1)`` times smaller than the latent and is patchified
    with ``patch_size / 2**(levels-1)`` so one position still covers a k x k latent patch. The up path
    mirrors diffusers' ``UNet2DModel`` (no mid block): ``UpBlock2D`` levels with one more resnet than the
    down levels, consuming the down path's outputs as skip connections.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Imported here so the linear adapter (and everything else) works without diffusers installed.
        from diffusers.models.unets.unet_2d_blocks import get_down_block, get_up_block

        chans = cfg.unet_channels
        n_levels = len(chans)
        self.patch_size = cfg.patch_size
        self.downsample = cfg.unet_downsample
        self.inner_patch = cfg.patch_size // self.downsample
        temb_dim = 4 * chans[0]
        common = dict(
            resnet_eps=1e-6, resnet_act_fn="silu", resnet_groups=cfg.unet_groups, attention_head_dim=8
        )

        self.t_embed = TimestepEmbedder(cfg.timestep_freq_dim, temb_dim)
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = chans[0]
        for i, ch in enumerate(chans):
            self.down_blocks.append(
                get_down_block(
                    "DownBlock2D",
                    num_layers=cfg.unet_layers_per_block,
                    in_channels=prev,
                    out_channels=ch,
                    temb_channels=temb_dim,
                    add_downsample=i < n_levels - 1,
                    downsample_padding=1,
                    **common,
                )
            )
            prev = ch
        feat_dim = chans[-1] * self.inner_patch**2
        self.in_proj = nn.Linear(feat_dim, cfg.dim)
        self.t_proj = nn.Linear(temb_dim, cfg.dim)  # timestep embedding also added to the positions

        self.out_proj = nn.Linear(cfg.dim, feat_dim)
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        out_ch = rev[0]
        for i in range(n_levels):
            prev_out, out_ch = out_ch, rev[i]
            self.up_blocks.append(
                get_up_block(
                    "UpBlock2D",
                    num_layers=cfg.unet_layers_per_block + 1,
                    in_channels=rev[min(i + 1, n_levels - 1)],
                    out_channels=out_ch,
                    prev_output_channel=prev_out,
                    temb_channels=temb_dim,
                    add_upsample=i < n_levels - 1,
                    **common,
                )
            )
        self.norm_out = nn.GroupNorm(cfg.unet_groups, chans[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[0], cfg.latent_channels, kernel_size=3, padding=1)

    def encode(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, AdapterContext]:
        H, W = x_t.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"latents spatial size (H, W) = ({H}, {W}) is not divisible by patch_size = {self.patch_size}"
            )
        temb = self.t_embed(t)
        h = self.conv_in(x_t)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            h, states = block(h, temb)
            skips += states
        tokens = self.in_proj(patchify(h, self.inner_patch)) + self.t_proj(temb)[:, None]
        return tokens, AdapterContext(height=H, width=W, temb=temb, skips=skips)

    def decode(self, hidden: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        d = self.downsample
        h = unpatchify(self.out_proj(hidden), self.inner_patch, ctx.height // d, ctx.width // d)
        skips = ctx.skips
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], ctx.temb)
            skips = skips[:-n]
        return self.conv_out(nn.functional.silu(self.norm_out(h)))

    def in_parameters(self) -> list[nn.Parameter]:
        mods = (self.t_embed, self.conv_in, self.down_blocks, self.in_proj, self.t_proj)
        return [p for m in mods for p in m.parameters()]

    def out_parameters(self) -> list[nn.Parameter]:
        mods = (self.out_proj, self.up_blocks, self.norm_out, self.conv_out)
        return [p for m in mods for p in m.parameters()]


def build_adapter(cfg: ModelConfig) -> ImageAdapter:
    """The adapter named by ``cfg.adapter``."""
    if cfg.adapter == "linear":
        return LinearAdapter(cfg)
    if cfg.adapter == "unet":
        return UNetAdapter(cfg)
    raise ValueError(f"ModelConfig.adapter = {cfg.adapter!r} is not one of 'linear', 'unet'")


__all__ = [
    "AdapterContext",
    "ImageAdapter",
    "LinearAdapter",
    "TimestepEmbedder",
    "UNetAdapter",
    "build_adapter",
    "patchify",
    "timestep_features",
    "unpatchify",
]
