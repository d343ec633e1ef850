"""FID / KID through torch-fidelity with a registered feature extractor.

* ``extractor="cnn"`` (default): the suite's shapes CNN (``transfusion.eval.features``), trained on
  real images and cached as safetensors; registered into torch-fidelity as ``SHAPES_CNN_NAME``.
* ``extractor="inception"``: torch-fidelity's ``inception-v3-compat``, only from a local
  ``weights_path`` (never downloaded; a missing file raises ``FileNotFoundError`` naming it).

Images: uint8 ``(N, 3, H, W)`` / ``(N, H, W, 3)`` tensors or arrays, or float ``(N, 3, H, W)`` in
``[-1, 1]`` (the ``ShapesDataset`` convention).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from transfusion.eval.features import FeatureCNNConfig, get_feature_cnn, load_feature_cnn

SHAPES_CNN_NAME = "transfusion-shapes-cnn"
INCEPTION_NAME = "inception-v3-compat"
EXTRACTORS = ("cnn", "inception")


class ShapesCNNFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of ``ShapesFeatureCNN``; weights from ``feature_extractor_weights_path``."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{SHAPES_CNN_NAME}: feature_extractor_weights_path is required")
        self.net = load_feature_cnn(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        feats, logits = self.net(x)
        out = {"features": feats, "logits": logits.flatten(1)}
        return tuple(out[name] for name in self.features_list)


def register_shapes_cnn() -> str:
    """Register the CNN extractor with torch-fidelity (idempotent); returns its name."""
    if SHAPES_CNN_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(SHAPES_CNN_NAME, ShapesCNNFeatureExtractor)
    return SHAPES_CNN_NAME


register_shapes_cnn()


def to_uint8_images(images) -> torch.Tensor:
    """Normalise an image batch to a uint8 (N, 3, H, W) CPU tensor."""
    x = torch.from_numpy(np.asarray(images)) if not torch.is_tensor(images) else images.detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"images: expected a 4-D batch, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"images: expected 3 channels, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"images: expected uint8 or float in [-1, 1], got {x.dtype}")
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.contiguous()


class _ImageDataset(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def fid_kid(
    real_images,
    fake_images,
    extractor: str = "cnn",
    *,
    weights_path: str | os.PathLike | None = None,
    cnn_config: FeatureCNNConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = 2020,
) -> dict:
    """FID and KID of ``fake_images`` against ``real_images``.

    ``extractor="cnn"`` uses ``weights_path`` if given (a file from ``save_feature_cnn``), else the
    cached CNN for ``cnn_config`` (trained on first use). ``extractor="inception"`` requires
    ``weights_path`` (torch-fidelity's pt-inception state dict). ``kid_subset_size`` defaults to
    ``min(1000, n_real // 2, n_fake // 2)`` (subsets must differ). Returns ``{"fid", "kid_mean",
    "kid_std", "n_real", "n_fake", "extractor", "feature_layer"}``.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor: unknown {extractor!r}, expected one of {EXTRACTORS}")
    real, fake = to_uint8_images(real_images), to_uint8_images(fake_images)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"need >= 2 images per side, got {len(real)} real and {len(fake)} fake")
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(f"{extractor} feature extractor weights not found: {weights_path}")
    if extractor == "inception":
        if weights_path is None:
            raise ValueError(
                "extractor='inception' needs weights_path (Inception weights are never downloaded)"
            )
        name, layer = INCEPTION_NAME, "2048"
    else:
        name, layer = register_shapes_cnn(), "features"
        if weights_path is None:
            weights_path = get_feature_cnn(cnn_config, cache_dir)
    subset = kid_subset_size or min(1000, len(real) // 2, len(fake) // 2)
    metrics = torch_fidelity.calculate_metrics(
        input1=_ImageDataset(real),
        input2=_ImageDataset(fake),
        fid=True,
        kid=True,
        feature_extractor=name,
        feature_layer_fid=layer,
        feature_layer_kid=layer,
        feature_extractor_weights_path=str(weights_path),
        kid_subsets=kid_subsets,
        kid_subset_size=subset,
        batch_size=batch_size,
        cuda=device.startswith("cuda"),
        cache=False,
        save_cpu_ram=True,
        verbose=False,
        rng_seed=seed,
    )
    return {
        "fid": float(metrics["frechet_inception_distance"]),
        "kid_mean": float(metrics["kernel_inception_distance_mean"]),
        "kid_std": float(metrics["kernel_inception_distance_std"]),
        "n_real": len(real),
        "n_fake": len(fake),
        "extractor": name,
        "feature_layer": layer,
    }
