"""Latent caches: encode a dataset once, keep the latents (VAE) or codes (VQ) in one safetensors file.

The file is named by a hash key of

* the dataset's identity: ``dataset.cache_key()`` when the dataset defines it; otherwise its type, length,
  ``split`` / ``name`` attributes, dataclass ``config`` (for a ``Subset``: its indices and its parent's
  identity) and a hash of the pixels of up to 32 evenly spaced items (``dataset_identity``);
* the autoencoder's fingerprint (config, scaling factor, weights hash; ``TrainedAutoencoder.fingerprint``);
* what is stored (``latents`` or ``codes``) and the cache format version.

The file's metadata repeats the full key, the item count, the per-item shape and a hash of the stored
values. Before a file is used all of these are checked against the request and the tensor itself; a
stale, truncated, unreadable or edited file is logged and rebuilt, never silently used. Files are
written to a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset

from transfusion.autoencoders.model import TrainedAutoencoder
from transfusion.provenance import atomic_file
from transfusion.value_checks import is_int

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
TENSOR_NAME = "latents"
PIXEL_SAMPLE = 32


def _item_image(dataset: Dataset, index: int) -> torch.Tensor:
    item = dataset[index]
    image = item["image"] if isinstance(item, dict) else item
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"dataset: item {index} has no image tensor (got {type(image).__name__})")
    return image


def _pixel_hash(dataset: Dataset, n: int = PIXEL_SAMPLE) -> str:
    length = len(dataset)
    if length == 0:
        return hashlib.sha256(b"empty").hexdigest()
    count = min(n, length)
    idx = sorted({round(i * (length - 1) / max(count - 1, 1)) for i in range(count)})
    h = hashlib.sha256()
    for i in idx:
        t = _item_image(dataset, i).detach().to("cpu", torch.float32).contiguous()
        h.update(f"{i}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """A JSON-able description of a dataset: its ``cache_key()``, or its type, length, split, config and a
    hash of sampled pixels (a change to any of them gives a different cache key)."""
    key_fn = getattr(dataset, "cache_key", None)
    if callable(key_fn):
        return {"cache_key": str(key_fn()), "length": len(dataset)}
    ident: dict[str, Any] = {
        "type": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "length": len(dataset),
    }
    if isinstance(dataset, Subset):  # e.g. "the first n training examples": describe the parent too
        indices = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        ident["indices_sha256"] = hashlib.sha256(indices.numpy().tobytes()).hexdigest()
        ident["parent"] = dataset_identity(dataset.dataset)
    for attr in ("name", "split"):
        value = getattr(dataset, attr, None)
        if isinstance(value, (str, int)):
            ident[attr] = value
    config = getattr(dataset, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        ident["config"] = json.loads(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str))
    ident["pixels_sha256"] = _pixel_hash(dataset)
    return ident


def _what(ae: TrainedAutoencoder) -> str:
    return "codes" if ae.kind == "vq" else "latents"


def _key(ae: TrainedAutoencoder, ident: dict[str, Any]) -> str:
    payload = {"format": CACHE_FORMAT, "what": _what(ae), "dataset": ident, "autoencoder": ae.fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(ae: TrainedAutoencoder, dataset: Dataset) -> str:
    """The full hash key of ``ae``'s latents of ``dataset``."""
    return _key(ae, dataset_identity(dataset))


def cache_path(
    ae: TrainedAutoencoder, dataset: Dataset, cache_dir: str | Path, key: str | None = None
) -> Path:
    key = key or cache_key(ae, dataset)
    return Path(cache_dir) / f"{ae.kind}-{_what(ae)}-{key[:24]}.safetensors"


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _per_item_shape(ae: TrainedAutoencoder) -> tuple[int, ...]:
    return tuple(ae.code_shape) if ae.kind == "vq" else tuple(ae.latent_shape)


def _read_cache(
    path: Path, key: str, count: int, item_shape: tuple[int, ...]
) -> tuple[torch.Tensor | None, str]:
    """The cached tensor, or ``None`` and why it cannot be used."""
    if not path.is_file():
        return None, "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None, f"stale (key {meta.get('key', '<none>')[:12]}... != {key[:12]}...)"
            if meta.get("count") != str(count):
                return None, f"wrong item count ({meta.get('count')} recorded, the dataset has {count})"
            if TENSOR_NAME not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                return None, f"no {TENSOR_NAME!r} tensor"
            t = f.get_tensor(TENSOR_NAME)
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        return None, f"unreadable ({type(e).__name__}: {e})"
    if tuple(t.shape) != (count, *item_shape):
        return None, f"shape {tuple(t.shape)} != expected {(count, *item_shape)}"
    if meta.get("sha256") != _tensor_sha256(t):
        return None, "values do not match the recorded hash (edited or corrupt)"
    return t, "ok"


def _encode_all(ae: TrainedAutoencoder, dataset: Dataset, batch_size: int, progress: bool) -> torch.Tensor:
    from tqdm import tqdm

    n = len(dataset)
    chunks = []
    bar = tqdm(total=n, desc=f"encode {_what(ae)}", unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for start in range(0, n, batch_size):
            images = torch.stack([_item_image(dataset, i) for i in range(start, min(n, start + batch_size))])
            out = ae.encode_codes(images).to(torch.int32) if ae.kind == "vq" else ae.encode(images).float()
            chunks.append(out.cpu())
            bar.update(images.shape[0])
    if not chunks:
        shape = _per_item_shape(ae)
        return torch.zeros((0, *shape), dtype=torch.int32 if ae.kind == "vq" else torch.float32)
    return torch.cat(chunks)


def _write_cache(path: Path, t: torch.Tensor, meta: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        save_file({TENSOR_NAME: t.contiguous()}, tmp, metadata=meta)


def cached_latents(
    ae: TrainedAutoencoder,
    dataset: Dataset,
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Latents of every item of ``dataset``, in order, computed once and cached under ``cache_dir``.

    VAE: float32 ``(N, C, h, w)`` as ``ae.encode`` returns them (scaled posterior means).
    VQ: int64 ``(N, h, w)`` codebook indices as ``ae.encode_codes`` returns them.
    The result is on the CPU.
    """
    if not is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    ident = dataset_identity(dataset)
    key = _key(ae, ident)
    path = cache_path(ae, dataset, cache_dir, key)
    count, item_shape = len(dataset), _per_item_shape(ae)
    t, why = _read_cache(path, key, count, item_shape)
    if t is None:
        if why != "missing":
            logger.warning("latent cache %s is %s; rebuilding it", path, why)
        else:
            logger.info("latent cache %s does not exist; encoding %d items", path, count)
        t = _encode_all(ae, dataset, batch_size, progress)
        meta = {
            "key": key,
            "count": str(count),
            "shape": json.dumps(list(item_shape)),
            "dtype": str(t.dtype).removeprefix("torch."),
            "what": _what(ae),
            "kind": ae.kind,
            "sha256": _tensor_sha256(t),
            "dataset": json.dumps(ident, sort_keys=True, default=str),
            "autoencoder_path": str(ae.path) if ae.path is not None else "",
            "format": str(CACHE_FORMAT),
        }
        _write_cache(path, t, meta)
    return t.long() if ae.kind == "vq" else t
