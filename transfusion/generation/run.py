"""Loading a trained run for generation, and the image files around it (PNG grids, input images).

A run directory (written by ``transfusion.train``):

    DIR/config.json             "family": "transfusion" | "discrete", "model": ModelConfig fields, "train":
                                TrainConfig fields, "data": data info (data.latents.source: "auto" | "path"
                                | "pool", data.image_size: [H, W])
    DIR/checkpoints/latest.json {"step", "model": "step_XXXXXXXX.safetensors", ...}
    DIR/checkpoints/step_XXXXXXXX.safetensors   model weights
    DIR/tokenizer.json          the text tokenizer
    DIR/autoencoder/            the image autoencoder (data.latents.source "auto"; "path": data.latents.path):
                                a VAE for Transfusion, a VQ model for the discrete family

``load_run`` rebuilds the run's model family from config.json: ``Transfusion`` or
``transfusion.baseline.DiscreteLM`` (whose ``model.codebook_size`` config.json records); the
``text_to_image`` / ``caption`` API and ``transfusion generate`` take either.

A run trained on ``pool`` latents (smoke runs: average pooling + a fixed channel mix, no autoencoder) is
decoded with the least-squares inverse of that map (``PoolCodec``), so its samples can still be looked at.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Run:
    """A trained model with what is needed to talk to it."""

    path: Path
    model: Any  # Transfusion, or DiscreteLM for a "discrete" run; in eval mode
    tokenizer: Any  # transfusion.data.TextTokenizer
    autoencoder: (
        Any | None
    )  # encode(images) / decode(latents) (+ encode_codes / decode_codes for VQ); or None
    config: dict[str, Any]  # the run's config.json
    step: int
    family: str = "transfusion"  # the run's model family (config.json "family")


class PoolCodec:
    """The ``pool`` latent source (``training_data.pool_latents``) and its least-squares inverse."""

    def __init__(
        self, latent_channels: int, latent_size: int, image_size: int, seed: int, in_channels: int = 3
    ):
        from transfusion.training_data import pool_latents

        self.latent_channels, self.latent_size, self.image_size, self.seed = (
            latent_channels,
            latent_size,
            image_size,
            seed,
        )
        # The channel mix, read off by encoding constant one-hot images: column c = image of colour c.
        s = latent_size
        basis = torch.eye(in_channels)[:, :, None, None].repeat(1, 1, s, s)
        mix = pool_latents(basis, latent_channels, s, seed=seed)[:, :, 0, 0].T  # (C, c_in)
        self.unmix = torch.linalg.pinv(mix)  # (c_in, C)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        from transfusion.training_data import pool_latents

        return pool_latents(images.float().cpu(), self.latent_channels, self.latent_size, seed=self.seed)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("ck,nkhw->nchw", self.unmix, latents.float().cpu())
        return F.interpolate(rgb, size=(self.image_size, self.image_size), mode="nearest").clamp(-1.0, 1.0)


def _autoencoder_for(path: Path, cfg: dict[str, Any], model_cfg, seed: int, device: torch.device):
    info = cfg.get("data", {}).get("latents", {}) or {}
    source = info.get("source")
    if source == "pool":
        size = cfg.get("data", {}).get("image_size") or [model_cfg.latent_size * 4] * 2
        return PoolCodec(model_cfg.latent_channels, model_cfg.latent_size, int(size[0]), seed)
    candidates = [path / "autoencoder"]
    if info.get("path"):
        p = Path(info["path"])
        candidates.append(p if p.is_absolute() else path / p)
        candidates.append(p)
    for c in candidates:
        if (c / "autoencoder.json").is_file():
            from transfusion.autoencoders import load_autoencoder

            return load_autoencoder(c, device=device)
    return None


# Model class of each family, as "module:Class" (imported when a run of that family is loaded).
MODEL_CLASSES = {
    "transfusion": "transfusion.transfusion_model:Transfusion",
    "discrete": "transfusion.baseline:DiscreteLM",
}


def _model_class(family: str):
    import importlib

    module, name = MODEL_CLASSES[family].split(":")
    return getattr(importlib.import_module(module), name)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device = {str(device)!r}: CUDA is not available")
    return dev


def load_run(
    path: str | Path,
    step: int | None = None,
    device: str | torch.device = "cpu",
    attention: str | None = "sdpa",
) -> Run:
    """Model (latest or ``step`` checkpoint), tokenizer and autoencoder of a run directory.

    ``attention`` replaces the run's attention backend (decoding needs one that takes a query offset;
    training may have used xformers or flex); None keeps the run's.
    """
    from safetensors.torch import load_file

    from transfusion.config import ModelConfig
    from transfusion.data import load_tokenizer

    path = Path(path)
    dev = resolve_device(device)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (missing config.json)")
    cfg = json.loads(cfg_file.read_text())
    if "model" not in cfg:
        raise ValueError(f"{cfg_file}: no 'model' section")
    family = cfg.get("family", cfg.get("train", {}).get("family", "transfusion"))
    if family not in MODEL_CLASSES:
        raise ValueError(f"{path}: a {family!r} run; generation knows the families {sorted(MODEL_CLASSES)}")
    model_cfg = ModelConfig.from_dict(cfg["model"])
    if attention is not None:
        model_cfg = model_cfg.replace(attention=attention)
    ckdir = path / "checkpoints"
    if step is None:
        latest = ckdir / "latest.json"
        if not latest.is_file():
            raise FileNotFoundError(f"{ckdir}: no checkpoint (missing latest.json)")
        rec = json.loads(latest.read_text())
        weights, step = ckdir / rec["model"], int(rec["step"])
    else:
        weights = ckdir / f"step_{step:08d}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint not found")
    model = _model_class(family)(model_cfg)
    model.load_state_dict(load_file(str(weights), device="cpu"))
    model = model.to(dev).eval()
    tok_file = path / "tokenizer.json"
    tokenizer = load_tokenizer(tok_file) if tok_file.is_file() else None
    seed = int(cfg.get("train", {}).get("seed", 0))
    ae = _autoencoder_for(path, cfg, model_cfg, seed, dev)
    return Run(
        path=path, model=model, tokenizer=tokenizer, autoencoder=ae, config=cfg, step=int(step), family=family
    )


def image_size_of(autoencoder) -> int:
    """Pixel size of the autoencoder's square images."""
    size = getattr(autoencoder, "image_size", None)
    if size is None:
        size = autoencoder.config.image_size
    return int(size)


# ---------------------------------------------------------------------- image files
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> one (rows * (H + pad) + pad, cols * (W + pad) + pad, 3) uint8 image."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W); got {tuple(images.shape)}")
    N, _, H, W = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(N)))
    rows = math.ceil(N / cols)
    grid = torch.zeros(rows * (H + pad) + pad, cols * (W + pad) + pad, 3, dtype=torch.uint8)
    tiles = to_uint8(images)
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = tiles[i]
    return grid


def save_png(image_hwc: torch.Tensor, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 tensor as PNG (atomically)."""
    from PIL import Image

    from transfusion.provenance import atomic_file

    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        Image.fromarray(image_hwc.numpy()).save(tmp, format="PNG")
    return path


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file as a (1, 3, size, size) tensor in [-1, 1] (RGB, bicubic resize)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e
    x = data.view(size, size, 3).permute(2, 0, 1).float()
    return (x / 127.5 - 1.0)[None]


__all__ = [
    "MODEL_CLASSES",
    "PoolCodec",
    "Run",
    "image_size_of",
    "load_image",
    "load_run",
    "make_grid",
    "resolve_device",
    "save_png",
    "to_uint8",
]
