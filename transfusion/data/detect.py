"""Classical parsing of a shapes image into objects (colour, shape, size, position).

Pipeline (no learning):

1. background = per-channel median of all pixels (objects cover well under half);
   noise sigma = robust (MAD) estimate of the pixel deviations from it.
2. foreground = pixels whose largest channel difference from the background exceeds
   ``FG_THRESHOLD``; 8-connected components are candidate objects, and those whose
   summed intensity is below ``MIN_MASS`` of a cell are dropped as speckle.
3. colour = mean offset of the component's strongest pixels, named by the palette
   entry nearest in direction (brightness-invariant). Pixel weights = projection of
   (pixel - background) onto that colour, i.e. a coverage estimate, so anti-aliased
   edges count fractionally; the component is grown by one pixel to catch faint edges
   and coverage below a noise-adaptive floor is zeroed.
4. extent: the 4th-order cumulants of the weight distribution do not change under
   (Gaussian) blur, so ``|k40 + k04 + 2 k22| ** 0.25`` divided by each shape's constant
   estimates its extent, robust to blur.
5. shape by analysis-by-synthesis: each of the 4 shapes is rendered at the measured
   centroid, at ``EXTENT_STEPS`` around its extent estimate and blurred by each of
   ``BLUR_STEPS``; the shape whose best amplitude-fitted template leaves the least
   squared residual wins (its best extent is kept).
6. position = the grid cell holding the weighted centroid; size = extent above or
   below the midpoint between the small and large extents.

Measured (seed 31337, images never used for tuning): 100 % per attribute on 2000
clean 32 px test images, 500 at 64 px and 500 hold-out images. Degraded 32 px images
(Gaussian blur sigma in px, noise std in [-1, 1] units): blur 0.8 -> 100 %; blur 1.0
-> shape 99.2 %; noise 0.2 -> shape 99.8 %; blur 0.7 + noise 0.1 -> shape 99.8 %;
blur 1.3 -> shape 83 % and some merged objects; noise 0.3 -> shape 91 %, size 94 %.
At 64 px, blur 2.0 + noise 0.05 -> 100 %.

Limits: objects that touch or overlap (e.g. blurry generations whose halos meet)
merge into one component and come out as one object; blur beyond ~1 px (at 32 px)
erases the difference between small squares, circles and crosses; strong noise
creates spurious blobs or distorts shapes; a non-uniform background breaks the
median estimate; colours outside the palette are forced to the nearest palette name;
rotated or unknown shapes are forced to the nearest of the four templates; an object
straddling two cells is assigned the cell holding its centroid. Cost: ~4 ms per
32 px image on one CPU core (pure numpy, no scipy).
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from transfusion.data.image import as_uint8_hwc
from transfusion.data.shapes import PALETTE, POSITIONS, SHAPES, SIZE_FRACTION, coverage

FG_THRESHOLD = 0.25  # in [0, 1] units of the largest channel difference
NOISE_FLOOR = 2.5  # coverage below this many noise sigmas (relative to the colour) is background
MIN_MASS = 0.04  # summed intensity, as a fraction of a cell's area; less is speckle
# |k40 + k04 + 2 k22| ** 0.25 / extent, and mean squared radius / extent^2 (continuous shapes)
_K4_PER_EXTENT = {"circle": 0.3195, "square": 0.3593, "triangle": 0.2486, "cross": 0.2944}
_MSR_PER_EXTENT2 = {"circle": 0.1251, "square": 0.1666, "triangle": 0.0973, "cross": 0.1141}
EXTENT_STEPS = (0.88, 0.94, 1.0, 1.06)  # relative to the cumulant estimate (biased up by blur)
BLUR_STEPS = (0.0, 0.4, 0.7, 1.0, 1.4)  # Gaussian sigma, in pixels of a 32 px image
_SIZE_SPLIT = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str
    size: str
    position: str
    features: dict[str, float] = field(default_factory=dict, compare=False)

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "position": self.position}


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as (N, 2) arrays of (row, col)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pix = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pix.append((r, c))
            for dr, dc in itertools.product((-1, 0, 1), repeat=2):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        comps.append(np.asarray(pix))
    return comps


_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_DIRS = np.asarray([PALETTE[n] for n in _PALETTE_NAMES], np.float64)
_PALETTE_DIRS /= np.linalg.norm(_PALETTE_DIRS, axis=1, keepdims=True)


def nearest_color(rgb: np.ndarray) -> str:
    """Palette name closest in direction (brightness-invariant) to an RGB value."""
    v = np.asarray(rgb, np.float64)
    v = v / max(np.linalg.norm(v), 1e-9)
    return _PALETTE_NAMES[int(np.argmax(_PALETTE_DIRS @ v))]


def _moments(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> dict[str, float]:
    m = weights.sum()
    x, y = cols + 0.5, rows + 0.5
    cx, cy = (weights * x).sum() / m, (weights * y).sum() / m
    dx, dy = x - cx, y - cy

    def mu(p: int, q: int) -> float:
        return float((weights * dx**p * dy**q).sum() / m)

    k40 = mu(4, 0) - 3 * mu(2, 0) ** 2
    k04 = mu(0, 4) - 3 * mu(0, 2) ** 2
    k22 = mu(2, 2) - mu(2, 0) * mu(0, 2) - 2 * mu(1, 1) ** 2
    return {
        "mass": float(m),
        "cx": float(cx),
        "cy": float(cy),
        # box-filter pixels add 1/12 px^2 variance per axis; remove it
        "msr": max(mu(2, 0) + mu(0, 2) - 1 / 6, 1e-9),
        "k4": abs(k40 + k04 + 2 * k22) ** 0.25,
    }


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """``n x n`` Gaussian blur matrix (zero padding); identity for ``sigma`` ~ 0."""
    if sigma < 0.1:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    total = np.exp(-(np.arange(-n, n + 1) ** 2) / (2 * sigma**2)).sum()  # mass past the edge is lost
    return np.exp(-(d**2) / (2 * sigma**2)) / total


def _fit_shape(
    obs: np.ndarray, region: np.ndarray, top: int, left: int, f: dict[str, float], cell: float
) -> tuple[str, float, dict]:
    """Best template for the observed weights -> (shape, extent in px, residual per shape).

    Each shape is tried at the extents around its cumulant estimate and at a few blur
    widths (in units of a 32 px image's pixel); the best fit per shape is kept.
    """
    h, w = obs.shape
    norm = max(float((obs * obs).sum()), 1e-9)
    residuals, extents = {}, {}
    for shape in SHAPES:
        sizes = np.asarray(EXTENT_STEPS) * f["k4"] / _K4_PER_EXTENT[shape]
        sharp = np.stack([
            # the triangle's centroid sits extent/6 below its box centre
            coverage(shape, f["cx"], f["cy"] - (e / 6 if shape == "triangle" else 0), e, h, w, top, left)
            for e in sizes
        ])  # fmt: skip
        best = (np.inf, 0.0)
        for sigma in BLUR_STEPS:
            px = sigma * cell / (32 / 3)
            t = _blur_matrix(h, px) @ sharp @ _blur_matrix(w, px).T * region  # compare where measured
            amp = (t * obs).sum(axis=(1, 2)) / np.maximum((t * t).sum(axis=(1, 2)), 1e-9)
            err = ((obs - amp[:, None, None] * t) ** 2).sum(axis=(1, 2)) / norm
            i = int(np.argmin(err))
            best = min(best, (float(err[i]), float(sizes[i])))
        residuals[shape], extents[shape] = best
    winner = min(residuals, key=residuals.__getitem__)
    return winner, extents[winner], residuals


def parse_image(image: np.ndarray | torch.Tensor) -> list[DetectedObject]:
    """Objects found in an image (uint8 HxWx3, or float 3xHxW / HxWx3 in [-1, 1])."""
    img = as_uint8_hwc(image).astype(np.float64) / 255.0
    h, w, _ = img.shape
    cell_h, cell_w = h / 3, w / 3
    bg = np.median(img.reshape(-1, 3), axis=0)
    diff = img - bg
    strength = np.abs(diff).max(axis=2)
    noise = 1.4826 * float(np.median(np.abs(diff)))
    found = []
    for comp in components(strength > FG_THRESHOLD):
        rows, cols = comp[:, 0], comp[:, 1]
        s = strength[rows, cols]
        if s.sum() < MIN_MASS * cell_h * cell_w:  # absolute intensity: dim speckle never passes
            continue
        offset = diff[rows[s >= 0.75 * s.max()], cols[s >= 0.75 * s.max()]].mean(axis=0)
        norm2 = float(offset @ offset)
        # grow by one pixel (plus a margin for the template window) so faint edges count
        top, left = max(0, rows.min() - 2), max(0, cols.min() - 2)
        bottom, right = min(h, rows.max() + 3), min(w, cols.max() + 3)
        grown = np.zeros((h, w), bool)
        for dr, dc in itertools.product((-1, 0, 1), repeat=2):
            grown[np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)] = True
        g_rows, g_cols = np.nonzero(grown)
        cov = diff[g_rows, g_cols] @ offset / norm2
        floor = min(0.3, NOISE_FLOOR * noise / np.sqrt(norm2))
        weights = np.clip((cov - floor) / (1 - floor), 0.0, None)
        f = _moments(weights, g_rows, g_cols)
        obs = np.zeros((bottom - top, right - left))
        obs[g_rows - top, g_cols - left] = weights
        region = grown[top:bottom, left:right]
        shape, extent, residuals = _fit_shape(obs, region, top, left, f, np.sqrt(cell_h * cell_w))
        f["extent"] = extent / np.sqrt(cell_h * cell_w)
        f.update({f"residual_{k}": v for k, v in residuals.items()})
        size = "large" if f["extent"] > _SIZE_SPLIT else "small"
        row, col = min(2, int(f["cy"] // cell_h)), min(2, int(f["cx"] // cell_w))
        found.append(DetectedObject(nearest_color(offset + bg), shape, size, POSITIONS[row * 3 + col], f))
    return found
