"""scikit-learn's bundled 8x8 handwritten digits (1797 images, no download needed).

Images are bilinearly upsampled to ``image_size`` and repeated to 3 channels (white
digit on black, ``[-1, 1]``). The split is a seeded permutation: 80 % train, 10 % val,
10 % test. Captions name the digit in one of a few phrasings, picked by
``(seed, index)`` so an item is always the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS: tuple[str, ...] = ("train", "val", "test")
_FRACTIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = ("the digit {d}", "a handwritten {d}", "the number {w}")
_SALT = 0xD161


@dataclass(frozen=True)
class DigitsConfig:
    image_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size: must be an int >= 8, got {self.image_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative int, got {self.seed!r}")


def digit_caption(label: int, style: int) -> str:
    return _TEMPLATES[style % len(_TEMPLATES)].format(d=label, w=DIGIT_WORDS[label])


def caption_label(caption: str) -> int | None:
    """The digit a caption names (numeral or English word), or None."""
    for token in caption.lower().split():
        if token.isdigit() and len(token) == 1:
            return int(token)
        if token in DIGIT_WORDS:
            return DIGIT_WORDS.index(token)
    return None


@functools.lru_cache(maxsize=1)  # parsing the bundled CSV is the slow part; do it once
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is a dev dependency
        raise ImportError("the 'digits' dataset needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


class DigitsDataset(Dataset):
    """Items: ``{"image": float32 (3, H, W) in [-1, 1], "caption": str, "label": int}``."""

    def __init__(self, config: DigitsConfig | None = None, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r}, expected one of {SPLITS}")
        self.config = config or DigitsConfig()
        self.split = split
        images, labels = _load()
        perm = np.random.default_rng(np.random.SeedSequence([self.config.seed, _SALT])).permutation(
            len(labels)
        )
        lo, hi = (round(f * len(labels)) for f in _FRACTIONS[split])
        self.indices = perm[lo:hi]
        x = torch.from_numpy(images[self.indices])[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
        if self.config.image_size != 8:
            x = F.interpolate(x, size=self.config.image_size, mode="bilinear", align_corners=False)
        self.images = x.clamp(-1.0, 1.0).expand(-1, 3, -1, -1).contiguous()
        self.labels = labels[self.indices]
        style_rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, _SALT, 1]))
        self.styles = style_rng.integers(len(_TEMPLATES), size=len(labels))[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for length {len(self)}")
        label = int(self.labels[index])
        return {
            "image": self.images[index].clone(),
            "caption": digit_caption(label, int(self.styles[index])),
            "label": label,
        }
