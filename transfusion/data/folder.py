"""Any directory of images with a ``captions.jsonl`` index.

Each non-blank line of ``<root>/captions.jsonl`` is a JSON object
``{"file": "relative/path.png", "caption": "..."}``. The index is validated when the
dataset is built: a bad JSON line, a missing/non-string key or a missing image file
raises ``ValueError`` naming ``captions.jsonl:<line>`` and the file. Images are
decoded lazily (``verify=True`` decodes all of them up front); an unreadable image
raises ``ValueError`` naming the file. Images are converted to RGB, the shorter side
resized to ``image_size`` (bicubic) and centre-cropped.

Splits are a seeded permutation of the index lines: ``val_fraction`` and
``test_fraction`` of the items (rounded) go to val and test, the rest to train;
``split="all"`` keeps every item in file order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from transfusion.data.image import resize_center_crop, uint8_to_tensor

INDEX_NAME = "captions.jsonl"
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
_SALT = 0xF01D


@dataclass(frozen=True)
class FolderConfig:
    root: str | Path = ""
    image_size: int = 32
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    verify: bool = False

    def __post_init__(self) -> None:
        if not str(self.root):
            raise ValueError("root: a directory is required")
        if not Path(self.root).is_dir():
            raise ValueError(f"root: not a directory: {self.root!s}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size: must be a positive int, got {self.image_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative int, got {self.seed!r}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {v!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction: val + test must be < 1, got {self.val_fraction + self.test_fraction}"
            )


def read_index(root: str | Path) -> list[tuple[Path, str]]:
    """Parse and check ``captions.jsonl`` -> [(image path, caption)] in file order."""
    root = Path(root)
    index = root / INDEX_NAME
    if not index.is_file():
        raise ValueError(f"{index}: caption index not found")
    entries = []
    with index.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{index}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for key in ("file", "caption"):
                if key not in rec:
                    raise ValueError(f"{where}: missing key {key!r}")
                if not isinstance(rec[key], str):
                    raise ValueError(f"{where}: key {key!r} must be a string, got {rec[key]!r}")
            path = root / rec["file"]
            if not path.is_file():
                raise ValueError(f"{where}: image file not found: {path}")
            entries.append((path, rec["caption"]))
    if not entries:
        raise ValueError(f"{index}: no entries")
    return entries


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode, convert to RGB, resize and centre-crop -> uint8 (H, W, 3)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for broken files
        raise ValueError(f"{path}: cannot decode image ({e})") from e
    return np.asarray(resize_center_crop(rgb, image_size), dtype=np.uint8)


class FolderDataset(Dataset):
    """Items: ``{"image": float32 (3, H, W) in [-1, 1], "caption": str, "file": str}``."""

    def __init__(self, config: FolderConfig, split: str = "all") -> None:
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r}, expected one of {SPLITS}")
        self.config = config
        self.split = split
        entries = read_index(config.root)
        if split != "all":
            n = len(entries)
            perm = np.random.default_rng(np.random.SeedSequence([config.seed, _SALT])).permutation(n)
            n_val, n_test = round(n * config.val_fraction), round(n * config.test_fraction)
            bounds = {"val": (0, n_val), "test": (n_val, n_val + n_test), "train": (n_val + n_test, n)}
            lo, hi = bounds[split]
            entries = [entries[i] for i in sorted(perm[lo:hi])]
        self.entries = entries
        if config.verify:
            for path, _ in entries:
                load_image(path, config.image_size)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for length {len(self)}")
        path, caption = self.entries[index]
        image = uint8_to_tensor(load_image(path, self.config.image_size))
        return {"image": image, "caption": caption, "file": str(path)}
