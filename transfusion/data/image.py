"""Image layout conversions shared by every data source.

Convention: datasets hand out ``torch.float32`` tensors of shape ``(3, H, W)``
with values in ``[-1, 1]``; renderers and files work with ``uint8`` arrays of
shape ``(H, W, 3)``. These helpers convert between the two.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def uint8_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` -> ``float32 (3, H, W)`` in ``[-1, 1]``."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    t = torch.from_numpy(np.array(arr, order="C")).permute(2, 0, 1).float()  # copy: input may be read-only
    return t / 127.5 - 1.0


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """``float (3, H, W)`` in ``[-1, 1]`` -> ``uint8 (H, W, 3)`` (values are clipped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W), got {tuple(image.shape)}")
    # numpy is much faster than torch for these tiny per-image arrays
    arr = image.detach().to("cpu", torch.float32).numpy()
    arr = np.round((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def as_uint8_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Accept either layout and return ``uint8 (H, W, 3)``.

    Float inputs (tensor or array) are taken to be in ``[-1, 1]``; channel-first
    inputs are recognised by a leading dimension of 3.
    """
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return as_uint8_hwc(image.cpu().numpy())
        return tensor_to_uint8(image if image.shape[0] == 3 else image.permute(2, 0, 1))
    arr = np.asarray(image)
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[2]):
        raise ValueError(f"image: expected a 3-channel image, got shape {arr.shape}")
    if arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return tensor_to_uint8(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
