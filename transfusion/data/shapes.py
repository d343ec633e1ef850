"""Procedural "shapes" dataset: 1-N coloured objects on a plain black background.

Every image is a 3x3 grid of cells; each object sits inside its own cell (never two
objects per cell, never overlapping, always >= 2 px apart at 32 px). Attributes:

* colour: one of ``COLORS`` (6 hues chosen far apart); each object's shade is the
  palette RGB times a brightness in [0.8, 1] plus a per-channel offset in [-15, 15]
* shape: circle, square, triangle (apex up) or cross (a plus sign)
* size: small (0.5 of a cell side) or large (0.74 of a cell side), +-6 % jitter
* position: one of the 9 ``POSITIONS`` cells, with a small centre jitter

The background is pure black ``(0, 0, 0)``. Objects are rendered with 4x4
super-sampling (anti-aliased edges). Images hold 1..``max_objects`` objects (uniform).

Captions state colour, shape, size and position of every object, in one of four
phrasings per image ("a small red circle at the top left", "there is a large blue
square in the center", "top right: a small green triangle", "one cyan cross of large
size at the bottom left"); objects are joined with "and".

Sample ``i`` of split ``s`` with seed ``S`` is a pure function of ``(S, s, i)``: its
random generator is seeded by ``SeedSequence([S, salt, split_id, i])``, so splits are
independent streams and the set is unlimited in size. The ``holdout`` split contains
colour-shape pairs (``ShapesConfig.holdout_pairs``) that train/val/test never use.

``ShapesGenerator.sample`` returns a ``ShapesSample`` whose ``image`` is ``uint8
(H, W, 3)``; ``ShapesDataset`` (the torch wrapper) returns ``float32 (3, H, W)`` in
``[-1, 1]``. ``transfusion.data.image`` converts between the two.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from transfusion.data.image import uint8_to_tensor

# RGB values (0-255) spaced far apart in hue so nearest-colour judging stays easy.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 50),
    "blue": (45, 75, 240),
    "yellow": (235, 215, 35),
    "purple": (160, 45, 215),
    "cyan": (35, 205, 220),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "val", "test", "holdout")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

# Object extent (bounding-box side) as a fraction of the cell side.
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.74}
SIZE_JITTER = 0.06  # relative, uniform +-
POSITION_JITTER = 0.12  # fraction of a cell, further limited so the object stays in its cell
CROSS_ARM = 0.4  # arm width of the cross relative to its extent
SUPERSAMPLE = 4

DEFAULT_HOLDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "cross"),
    ("green", "circle"),
)
DEFAULT_LENGTHS: dict[str, int] = {"train": 50_000, "val": 1_000, "test": 1_000, "holdout": 1_000}

_SALT = 0x5A4E5  # keeps these streams apart from other users of the same seed
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class ShapeObject:
    """Ground truth of one rendered object (``center`` and ``extent`` in pixels)."""

    color: str
    shape: str
    size: str
    position: str
    center: tuple[float, float] = field(default=(0.0, 0.0), compare=False)
    extent: float = field(default=0.0, compare=False)

    @property
    def cell(self) -> int:
        return POSITIONS.index(self.position)

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class ShapesSample:
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class ShapesConfig:
    """Configuration of the shapes dataset.

    ``holdout_pairs=None`` means ``DEFAULT_HOLDOUT_PAIRS`` unless ``holdout_fraction``
    is positive, in which case that fraction of all colour-shape pairs is chosen by
    ``seed`` (every colour and every shape keeps at least one training pair).
    Pass ``holdout_pairs=()`` to disable the hold-out.
    """

    image_size: int = 32
    max_objects: int = 2
    seed: int = 0
    holdout_pairs: tuple[tuple[str, str], ...] | None = None
    holdout_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 24:
            raise ValueError(f"image_size: must be an int >= 24, got {self.image_size!r}")
        if not isinstance(self.max_objects, int) or not 1 <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects: must be an int in [1, 9], got {self.max_objects!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative int, got {self.seed!r}")
        frac = self.holdout_fraction
        if not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise ValueError(f"holdout_fraction: must be a number in [0, 1), got {frac!r}")
        if self.holdout_pairs is not None:
            if frac > 0:
                raise ValueError("holdout_fraction: cannot be combined with explicit holdout_pairs")
            if isinstance(self.holdout_pairs, str) or not hasattr(self.holdout_pairs, "__iter__"):
                raise ValueError(f"holdout_pairs: expected (color, shape) pairs, got {self.holdout_pairs!r}")
            pairs = tuple(tuple(p) if not isinstance(p, str) else (p,) for p in self.holdout_pairs)
            for pair in pairs:
                if len(pair) != 2 or pair[0] not in PALETTE or pair[1] not in SHAPES:
                    raise ValueError(f"holdout_pairs: invalid (color, shape) pair {pair!r}")
            if len(set(pairs)) == len(COLORS) * len(SHAPES):
                raise ValueError("holdout_pairs: holds out every pair, nothing left to train on")
            object.__setattr__(self, "holdout_pairs", pairs)

    def resolved_holdout(self) -> tuple[tuple[str, str], ...]:
        """The colour-shape pairs excluded from train/val/test."""
        if self.holdout_pairs is not None:
            return self.holdout_pairs
        if self.holdout_fraction <= 0:
            return DEFAULT_HOLDOUT_PAIRS
        return _pick_holdout(self.seed, self.holdout_fraction)


def _pick_holdout(seed: int, fraction: float) -> tuple[tuple[str, str], ...]:
    pairs = list(itertools.product(COLORS, SHAPES))
    k = max(1, round(fraction * len(pairs)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SALT, 99]))
    for _ in range(1000):  # rejection: keep every colour and shape trainable
        chosen = [pairs[i] for i in sorted(rng.choice(len(pairs), k, replace=False))]
        kept = set(pairs) - set(chosen)
        if {c for c, _ in kept} == set(COLORS) and {s for _, s in kept} == set(SHAPES):
            return tuple(chosen)
    raise ValueError(f"holdout_fraction: {fraction} leaves some colour or shape without training pairs")


# ---------------------------------------------------------------- rendering


def coverage(
    shape: str, cx: float, cy: float, extent: float, height: int, width: int, top: int = 0, left: int = 0
) -> np.ndarray:
    """Fraction of each pixel covered by the shape, by ``SUPERSAMPLE``^2 point sampling.

    The window is ``height x width`` pixels starting at pixel ``(top, left)``; ``(cx, cy)``
    is the bounding-box centre in image coordinates (pixel ``(r, c)`` spans ``[c, c+1]``).
    """
    ss = SUPERSAMPLE
    ys = top + (np.arange(height * ss) + 0.5) / ss
    xs = left + (np.arange(width * ss) + 0.5) / ss
    y, x = np.meshgrid(ys, xs, indexing="ij")
    dx, dy, h = x - cx, y - cy, extent / 2
    if shape == "circle":
        inside = dx * dx + dy * dy <= h * h
    elif shape == "square":
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":  # apex at the top, base at the bottom, base == height
        depth = dy + h  # 0 at the apex, extent at the base
        inside = (depth >= 0) & (depth <= extent) & (np.abs(dx) <= depth / 2)
    elif shape == "cross":
        arm = CROSS_ARM * h
        inside = ((np.abs(dx) <= h) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= h) & (np.abs(dx) <= arm))
    else:
        raise ValueError(f"shape: unknown shape {shape!r}")
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3))


def render(objects: tuple[ShapeObject, ...], colors: list[np.ndarray], image_size: int) -> np.ndarray:
    """Paint objects (with their jittered RGB ``colors``) onto the background -> uint8 HxWx3."""
    img = np.empty((image_size, image_size, 3), np.float64)
    img[:] = BACKGROUND
    for obj, rgb in zip(objects, colors, strict=True):
        cov = coverage(obj.shape, *obj.center, obj.extent, image_size, image_size)[..., None]
        img = img * (1 - cov) + rgb * cov
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- captions

_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "there is a {size} {color} {shape} {where}",
    "{pos}: a {size} {color} {shape}",
    "one {color} {shape} of {size} size {where}",
)


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def describe(obj: ShapeObject, style: int, first: bool = True) -> str:
    """One object in phrasing ``style`` (0..3); style 1 says "there is" only once."""
    template = _TEMPLATES[style]
    if style == 1 and not first:
        template = _TEMPLATES[0]
    return template.format(
        size=obj.size, color=obj.color, shape=obj.shape, pos=obj.position, where=position_phrase(obj.position)
    )


def make_caption(objects: tuple[ShapeObject, ...], style: int) -> str:
    return " and ".join(describe(o, style, first=i == 0) for i, o in enumerate(objects))


NUM_CAPTION_STYLES = len(_TEMPLATES)


# ---------------------------------------------------------------- sampling


class ShapesGenerator:
    """Deterministic sampler: ``sample(split, index)`` is a pure function of the config."""

    def __init__(self, config: ShapesConfig | None = None) -> None:
        self.config = config or ShapesConfig()
        held = self.config.resolved_holdout()
        self.holdout_pairs = tuple(held)
        self.train_pairs = tuple(p for p in itertools.product(COLORS, SHAPES) if p not in set(held))

    def rng(self, split: str, index: int) -> np.random.Generator:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split: unknown split {split!r}, expected one of {SPLITS}")
        if index < 0:
            raise ValueError(f"index: must be >= 0, got {index}")
        return np.random.default_rng(
            np.random.SeedSequence([self.config.seed, _SALT, _SPLIT_IDS[split], index])
        )

    def sample(self, split: str, index: int) -> ShapesSample:
        rng = self.rng(split, index)
        if split == "holdout" and not self.holdout_pairs:
            raise ValueError("split: 'holdout' requested but holdout_pairs is empty")
        size_px = self.config.image_size
        cell = size_px / 3
        n = int(rng.integers(1, self.config.max_objects + 1))
        cells = rng.choice(len(POSITIONS), n, replace=False)
        objects, colors = [], []
        for k, c in enumerate(cells):
            pool = self.holdout_pairs if split == "holdout" and k == 0 else self.train_pairs
            color, shape = pool[int(rng.integers(len(pool)))]
            size = SIZES[int(rng.integers(2))]
            extent = cell * SIZE_FRACTION[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
            # keep the bounding box >= 1 px (scaled) inside the cell so neighbours never touch
            margin = max(1.0, cell * 0.094)
            slack = max(0.0, min(cell * POSITION_JITTER, cell / 2 - margin - extent / 2))
            row, col = divmod(int(c), 3)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            objects.append(ShapeObject(color, shape, size, POSITIONS[c], (cx, cy), extent))
            shade = rng.uniform(0.8, 1.0) * np.asarray(PALETTE[color], np.float64)
            colors.append(np.clip(shade + rng.uniform(-15, 15, 3), 0, 255))
        objs = tuple(objects)
        style = int(rng.integers(NUM_CAPTION_STYLES))
        return ShapesSample(render(objs, colors, size_px), make_caption(objs, style), objs)


class ShapesDataset(Dataset):
    """Torch view of one split with a fixed length.

    Items are ``{"image": float32 (3, H, W) in [-1, 1], "caption": str,
    "objects": list[ShapeObject]}``.
    """

    def __init__(self, config: ShapesConfig | None = None, split: str = "train", length: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r}, expected one of {SPLITS}")
        length = DEFAULT_LENGTHS[split] if length is None else length
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length: must be a positive int, got {length!r}")
        self.config = config or ShapesConfig()
        self.generator = ShapesGenerator(self.config)
        self.split = split
        self.length = length
        if split == "holdout" and not self.generator.holdout_pairs:
            raise ValueError("split: 'holdout' requested but holdout_pairs is empty")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        s = self.generator.sample(self.split, int(index))
        return {"image": uint8_to_tensor(s.image), "caption": s.caption, "objects": list(s.objects)}
