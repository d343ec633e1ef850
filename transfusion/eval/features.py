"""Small CNN feature extractor for FID/KID on the shapes dataset.

The network is trained by the suite (no downloads) on real ``ShapesGenerator`` images to predict,
for every one of the 9 grid cells, the colour / shape / size of the object in it (or "empty"),
from the generator's ground truth. Its penultimate activations (``FeatureCNNConfig.feature_dim``)
are the features FID/KID use.

Training is deterministic given the config (seeded generator, single-process, fixed data order),
and the trained weights are stored as safetensors under a cache directory, in a file whose name is
a hash of the config; the config itself travels in the file's metadata so ``load_feature_cnn``
needs nothing but the path.

Inputs to the network are ``uint8 (N, 3, H, W)`` images; other sizes are resized (bilinear) to
``image_size``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from transfusion.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesConfig, ShapesGenerator
from transfusion.provenance import atomic_file

FORMAT_VERSION = 2
# Per-cell heads: colour / shape / size, each with an extra "empty" class (index 0).
HEAD_SIZES: tuple[int, ...] = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)


@dataclass(frozen=True)
class FeatureCNNConfig:
    """Architecture, training and data settings of the shapes feature CNN (all part of the cache key)."""

    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 64
    train_steps: int = 300
    batch_size: int = 64
    train_images: int = 4096
    lr: float = 3e-3
    seed: int = 0
    # Which shapes data the network is trained on (a ShapesConfig's fields).
    data_seed: int = 0
    max_objects: int = 2

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.feature_dim <= 0 or not self.channels:
            raise ValueError(f"FeatureCNNConfig: invalid architecture {self}")
        if self.train_steps <= 0 or self.batch_size <= 0 or self.train_images < self.batch_size:
            raise ValueError(f"FeatureCNNConfig: invalid training settings {self}")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["format_version"] = FORMAT_VERSION
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureCNNConfig:
        d = json.loads(text)
        version = d.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"feature CNN format_version {version!r}, expected {FORMAT_VERSION}")
        d["channels"] = tuple(d["channels"])
        return cls(**d)

    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(image_size=self.image_size, max_objects=self.max_objects, seed=self.data_seed)


class ShapesFeatureCNN(nn.Module):
    """Conv stack (stride-2 after the first layer) -> flatten -> linear ``feature_dim`` -> per-cell heads."""

    def __init__(self, config: FeatureCNNConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in, size = 3, config.image_size
        for i, c in enumerate(config.channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.GroupNorm(1, c), nn.SiLU()]
            c_in = c
            size = size if stride == 1 else (size + 1) // 2
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in * size * size, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, len(POSITIONS) * sum(HEAD_SIZES))
        # Per-dimension centring and one global scale of the output features, set from real training
        # images after training (a global scale keeps the feature geometry); KID's cubic kernel needs
        # O(1) features.
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))

    @staticmethod
    def preprocess(images: torch.Tensor, image_size: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return x

    def _hidden(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images, self.config.image_size)
        return F.silu(self.proj(self.convs(x).flatten(1)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> standardised float32 (N, feature_dim)."""
        return (self._hidden(images) - self.feature_mean) / self.feature_std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(standardised features, logits)``; logits are (N, 9, sum(HEAD_SIZES))."""
        h = self._hidden(images)
        logits = self.head(h).view(h.shape[0], len(POSITIONS), sum(HEAD_SIZES))
        return (h - self.feature_mean) / self.feature_std, logits


def _labels(objects) -> np.ndarray:
    """(9, 3) int64 targets: per cell (colour, shape, size), 0 = empty cell."""
    out = np.zeros((len(POSITIONS), 3), dtype=np.int64)
    for o in objects:
        out[o.cell] = (COLORS.index(o.color) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1)
    return out


def training_data(config: FeatureCNNConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Real train-split images (uint8 (N, 3, H, W)) and their per-cell labels ((N, 9, 3))."""
    gen = ShapesGenerator(config.shapes_config())
    images, labels = [], []
    for i in range(config.train_images):
        s = gen.sample("train", i)
        images.append(s.image)
        labels.append(_labels(s.objects))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(labels))


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the three heads and the mean per-head accuracy."""
    loss, correct, start = logits.new_zeros(()), 0.0, 0
    for h, n in enumerate(HEAD_SIZES):
        part = logits[..., start : start + n].reshape(-1, n)
        target = labels[..., h].reshape(-1)
        loss = loss + F.cross_entropy(part, target)
        correct += (part.argmax(-1) == target).float().mean()
        start += n
    return loss, correct / len(HEAD_SIZES)


@torch.enable_grad()  # callers often evaluate under no_grad; training needs autograd regardless
def train_feature_cnn(config: FeatureCNNConfig | None = None) -> tuple[ShapesFeatureCNN, dict]:
    """Train the CNN deterministically on CPU; returns ``(model in eval mode, stats)``.

    ``stats`` holds the final training loss and the per-head accuracy on held-out ``val`` images.
    """
    config = config or FeatureCNNConfig()
    images, labels = training_data(config)
    g = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ShapesFeatureCNN(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.train_steps)
    model.train()
    order = torch.randperm(len(images), generator=g)
    pos, loss = 0, torch.zeros(())
    for _ in range(config.train_steps):
        if pos + config.batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        _, logits = model(images[idx])
        loss, _ = _loss(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        h = torch.cat([model._hidden(images[i : i + 512]) for i in range(0, len(images), 512)])
        model.feature_mean.copy_(h.mean(0))
        model.feature_std.fill_(float(h.var(0).mean().sqrt().clamp_min(1e-6)))
    gen = ShapesGenerator(config.shapes_config())
    val = [gen.sample("val", i) for i in range(256)]
    vx = torch.from_numpy(np.stack([s.image for s in val])).permute(0, 3, 1, 2).contiguous()
    vy = torch.from_numpy(np.stack([_labels(s.objects) for s in val]))
    with torch.no_grad():
        _, val_acc = _loss(model(vx)[1], vy)
    return model, {"train_loss": float(loss.detach()), "val_accuracy": float(val_acc)}


def save_feature_cnn(model: ShapesFeatureCNN, path: str | os.PathLike, stats: dict | None = None) -> Path:
    path = Path(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"config": model.config.to_json(), "stats": json.dumps(stats or {})}
    with atomic_file(path) as tmp:  # concurrent writers never leave a torn file
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_feature_cnn(path: str | os.PathLike) -> ShapesFeatureCNN:
    """Load a CNN saved by ``save_feature_cnn`` (config read from the safetensors metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature CNN weights not found: {path}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: not a feature CNN file (no 'config' in safetensors metadata)")
    model = ShapesFeatureCNN(FeatureCNNConfig.from_json(meta["config"]))
    model.load_state_dict(load_file(str(path)))
    model.requires_grad_(False)
    return model.eval()


def default_cache_dir() -> Path:
    """The suite's cache (the trainer's autoencoders live there too), ``fid/`` below it."""
    from transfusion.run_data import default_cache_dir as suite_cache

    return suite_cache() / "fid"


def feature_cnn_path(config: FeatureCNNConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"shapes_cnn_{config.key()}.safetensors"


def get_feature_cnn(
    config: FeatureCNNConfig | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Path of the cached CNN for ``config``, training and saving it first if absent."""
    config = config or FeatureCNNConfig()
    path = feature_cnn_path(config, cache_dir)
    if not path.is_file():
        model, stats = train_feature_cnn(config)
        save_feature_cnn(model, path, stats)
    return path
